"""Generate text from a causal LM, with or without a QLoRA adapter.

    python generate.py --model DIR [--adapter ADAPTER_DIR] "What is the capital of France?"
    python generate.py --model DIR --prompt-file prompts.txt     # one prompt a line, one batch
    cat prompts.txt | python generate.py --model DIR             # the same, from stdin
    python generate.py --model DIR --adapter OUT --chat          # multi-turn chat; /exit or EOF ends

Prompts go through the tokenizer's chat template as a user turn (`--raw` sends them as they
are). A single prompt streams to stdout as it is generated; several run as one batch and are
printed when done. The token rate goes to stderr, so stdout holds only the model's text.

Defaults: greedy decoding (`--temperature 0`), so the same model and prompt always give the
same answer, which is what you want when checking what a fine-tune learned; for varied chat
replies try `--temperature 0.7 --top-p 0.9`. The base: with an adapter train.py saved, the 4-bit
base it was trained on (its train_config.json's --quant and --double-quant: the adapter learned
to correct that base's quantization error), on the CPU too; otherwise NF4 on a GPU and fp32 on a
CPU. A GPTQ directory (merge.py --quantize gptq) runs with torch's int4 kernel on a GPU.

--prompt-file: one prompt per line; a file with blank lines holds prompts of several lines,
separated by blank lines; a .jsonl file holds one prompt a line, as a JSON string or {"prompt": ...}.
"""

import json
import os
import sys

from rawqlora.cli import ArgumentParser, run
from rawqlora.errors import BadInput

# ----------------------------------------------------------------------------- arguments


def parse_args(argv):
    p = ArgumentParser(prog="generate.py", description=__doc__.split("\n")[0])
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts; several run as one batch")
    p.add_argument("--model", required=True, help="Hugging Face model directory (the base)")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format) to apply on the base")
    p.add_argument("--prompt-file", help="prompts, one a line, or blank-line separated, or .jsonl ('-': stdin)")
    p.add_argument("--raw", action="store_true", help="send prompts as they are, no chat template")
    p.add_argument("--system", help="system message, as the first turn of the chat template")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off; 1.1-1.3 curbs loops")
    p.add_argument("--seed", type=int, help="sampling seed; the same seed repeats (default: random)")
    p.add_argument("--quant", choices=["nf4", "fp4", "none"],
                   help="default: the adapter's as trained (train_config.json), else nf4 on cuda, none on cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="compute dtype; default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: torch.compile the decode step before it is captured (tens of seconds once; "
                        "then ~40-60%% more tokens/s on an H200: for long outputs and chat sessions)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the model (custom architectures): only for models you trust")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors")
    args = p.parse_args(argv)

    if args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise BadInput(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise BadInput(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise BadInput(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise BadInput(f"--repetition-penalty must be > 0 (1 = off), got {args.repetition_penalty}")
    if args.temperature == 0 and (args.top_k or args.top_p < 1 or args.seed is not None):
        raise BadInput("--top-k, --top-p and --seed shape sampling; set --temperature > 0 (0 = greedy)")
    if args.raw and (args.chat or args.system is not None):
        raise BadInput("--chat and --system need the chat template; drop --raw")
    if args.chat and (args.prompts or args.prompt_file):
        raise BadInput("--chat reads its turns from stdin; drop the prompts and --prompt-file")
    if args.adapter is not None and not os.path.isdir(args.adapter):
        raise BadInput(f"--adapter {args.adapter}: no such directory; pass the adapter train.py saved")
    return args


if __name__ == "__main__":
    # --help and a bad flag answer here, in a fraction of a second: torch, transformers and
    # bitsandbytes (seconds of imports) load below, once the command line is known to be good.
    ARGS = run(parse_args)

import torch  # noqa: E402

import lora  # noqa: E402
import quant  # noqa: E402
from quant import gptq_checkpoint  # noqa: E402
from rawqlora import sibling_projections  # noqa: E402
from rawqlora.decode import Sampling, generate, stop_ids  # noqa: E402
from training.data import CHATML_TEMPLATE, chat_prompt_ids  # noqa: E402


def resolve(args):
    """The settings that depend on the machine, the model directory and the adapter's training."""
    quant.check_model_dir(args.model)  # before the tokenizer's less clear error
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda, but torch sees no GPU; use --device cpu")
    on_gpu = args.device == "cuda"
    if args.compile and not on_gpu:
        raise BadInput("--compile compiles the CUDA-graph decode step: it needs --device cuda")
    args.gptq = gptq_checkpoint.is_gptq(args.model)
    if args.gptq and (args.adapter or args.quant not in (None, "none")):
        raise BadInput(f"{args.model} is a GPTQ checkpoint (already quantized): drop --adapter and --quant; "
                       "merge the adapter first (merge.py --quantize gptq)")
    args.double_quant = True
    trained = os.path.join(args.adapter, "train_config.json") if args.adapter else None
    if trained and os.path.isfile(trained):
        with open(trained) as f:
            saved = json.load(f)
        args.quant = args.quant or saved.get("quant", "nf4")
        args.double_quant = saved.get("double_quant", True)
    args.quant = args.quant or ("nf4" if on_gpu else "none")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    return args


def read_prompts(args):
    """Prompts from the command line and --prompt-file, else from stdin when it is piped."""
    prompts = list(args.prompts)
    source = args.prompt_file
    if source is None and not prompts and not sys.stdin.isatty():
        source = "-"  # piped stdin reads like a prompt file
    if source == "-":
        prompts += split_prompts(sys.stdin.read(), jsonl=False)
    elif source is not None:
        if not os.path.isfile(source):
            raise BadInput(f"--prompt-file {source}: no such file")
        with open(source, encoding="utf-8") as f:
            prompts += split_prompts(f.read(), jsonl=source.endswith(".jsonl"))
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise BadInput("no prompt: pass PROMPT, --prompt-file, prompts on stdin, or --chat")
    return prompts


def split_prompts(text, jsonl):
    """A prompt file's prompts: JSON lines; or blocks between blank lines, when it has any (a prompt
    of several lines, e.g. a template with its input); else one prompt per line."""
    if jsonl:
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise BadInput(f"--prompt-file line {n}: not JSON ({e})") from None
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str):
                raise BadInput(f"--prompt-file line {n}: expected a JSON string or an object with a \"prompt\" string")
            prompts.append(prompt)
        return prompts
    lines = text.split("\n")
    if any(not line.strip() for line in lines[:-1]):  # blank lines (other than the final newline) separate prompts
        return [block.strip("\n") for block in text.split("\n\n") if block.strip()]
    return [line for line in lines if line.strip()]


# ----------------------------------------------------------------------------- loading


def load(args):
    tokenizer = quant.load_tokenizer(quant.tokenizer_source(args.model, args.adapter), args.trust_remote_code)
    if tokenizer.chat_template is None and not args.raw:
        print("note: the tokenizer has no chat template; using ChatML (--raw sends text as is)", file=sys.stderr)
        tokenizer.chat_template = CHATML_TEMPLATE
    if args.gptq:
        model = gptq_checkpoint.load_gptq(args.model, device=args.device, dtype=quant.DTYPES[args.dtype],
                                          trust_remote_code=args.trust_remote_code)
    else:
        model = quant.load_model(args.model, quant=None if args.quant == "none" else args.quant,
                                 double_quant=args.double_quant, compute_dtype=quant.DTYPES[args.dtype],
                                 device=args.device, trust_remote_code=args.trust_remote_code)
    if args.adapter is not None:
        lora.load_adapter(model, args.adapter)
    model.eval()  # no dropout, in the base or the adapter
    # q/k/v and gate/up as one product each where they are plain or GPTQ layers (a merged or a
    # GPTQ model): batch-1 decode reads small weights badly one by one (rawqlora/sibling_projections.py).
    sibling_projections.fuse(model)
    return tokenizer, model


def encode(tokenizer, messages_or_text, raw):
    if raw:
        # BOS etc. as the tokenizer adds them, unless the text already starts with its BOS.
        written = tokenizer.bos_token is not None and messages_or_text.startswith(tokenizer.bos_token)
        return tokenizer(messages_or_text, add_special_tokens=not written)["input_ids"]
    return chat_prompt_ids(tokenizer, messages_or_text)  # as the model was trained: BOS first


def turn(prompt, system):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]


# ----------------------------------------------------------------------------- output


class TextStream:
    """Prints a growing output as text, as its tokens come.

    Each step decodes the whole output and prints what is new. A token can end in the middle
    of a multi-byte character, which decodes to U+FFFD; such text is held back until the next
    token completes the character.
    """

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids, self.printed = [], 0

    def __call__(self, step):
        if step[0] is None:
            return
        self.ids.append(step[0])
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)

    def finish(self):
        """Print what was held back (an output cut mid-character ends in U+FFFD) and a newline."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()
        return text


def report(out):
    seconds = out.prefill_seconds + out.decode_seconds
    print(
        f"{out.new_tokens} tokens in {seconds:.2f}s ({out.new_tokens / seconds:.1f} tokens/s; "
        f"prefill of {out.prompt_tokens} prompt tokens {out.prefill_seconds:.2f}s)",
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------- main


def chat(args, tokenizer, model, decode):
    """Read a user turn, answer it, keep both in the history; /exit or EOF ends."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        print("> ", end="", file=sys.stderr, flush=True)  # stderr: stdout holds only replies
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            print(file=sys.stderr)  # end the "> " line, so the shell's prompt starts on its own
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        # The whole history is re-rendered and re-prefilled every turn: exactly what the
        # template says the model sees; keeping the KV cache across turns would only save time.
        stream = TextStream(tokenizer, sys.stdout)
        out = decode([encode(tokenizer, messages, raw=False)], stream)
        messages.append({"role": "assistant", "content": stream.finish()})
        report(out)


def warn_if_too_long(model, batch, max_new_tokens):
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(ids) for ids in batch) + max_new_tokens
    if limit and longest > limit:
        print(f"warning: prompt plus --max-new-tokens reaches {longest} positions, past the model's "
              f"max_position_embeddings ({limit}): output there is unreliable", file=sys.stderr)


def main(argv=None, args=None):
    args = resolve(args or parse_args(sys.argv[1:] if argv is None else argv))
    prompts = None if args.chat else read_prompts(args)
    tokenizer, model = load(args)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    stops = stop_ids(tokenizer, model)
    # Any id works as pad: pads are masked in the prompt and dropped from the outputs. (0: a
    # tokenizer with neither a pad token nor EOS, which quant.load_tokenizer would pad with.)
    pad_id = tokenizer.pad_token_id or 0

    def decode(batch, on_step=None):
        return generate(model, batch, args.max_new_tokens, stops, pad_id, sampling, on_step, compile=args.compile)

    if args.chat:
        return chat(args, tokenizer, model, decode)
    batch = [encode(tokenizer, p if args.raw else turn(p, args.system), args.raw) for p in prompts]
    warn_if_too_long(model, batch, args.max_new_tokens)
    if len(batch) == 1:
        stream = TextStream(tokenizer, sys.stdout)
        out = decode(batch, stream)
        stream.finish()
    else:
        out = decode(batch)
        for prompt, ids in zip(prompts, out.tokens):
            print(f">>> {prompt}\n{tokenizer.decode(ids, skip_special_tokens=True)}\n")
    report(out)


if __name__ == "__main__":
    run(lambda argv: main(args=ARGS))
