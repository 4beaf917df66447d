"""A config dataclass as a command line and as a config file: every field is a flag.

    values = parse(TrainConfig, argv, choices, base=lambda given: {...})

Precedence: flags > the --config file > `base(given)` (e.g. a resumed run's saved config) >
the dataclass defaults. Unknown flags and unknown file keys are errors, never ignored; a
setting under its Hugging Face TrainingArguments name (what tutorials write) gets one line
that names ours.
"""

import argparse
import dataclasses
import json
from pathlib import Path

from rawqlora import cli
from rawqlora.errors import BadInput

# TrainingArguments / SFTTrainer names -> ours, for the one-line hint.
TUTORIAL_NAMES = {
    "learning_rate": "lr", "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs", "lr_scheduler_type": "schedule", "warmup_steps": "warmup_steps",
    "gradient_checkpointing": "grad_ckpt", "max_seq_length": "max_len", "max_length": "max_len",
    "output_dir": "out", "save_steps": "save_every", "save_strategy": "save_every", "eval_steps": "eval_every",
    "eval_strategy": "eval_every", "evaluation_strategy": "eval_every", "save_total_limit": "keep_last",
    "bf16": "dtype", "fp16": "dtype", "target_modules": "targets", "lora_rank": "lora_r",
    "dataset_text_field": "format", "packing": "packing", "seed": "seed", "optim": "optim",
    "resume_from_checkpoint": "resume", "model_name_or_path": "model", "dataset_name": "data",
    "response_template": "response_marker", "instruction_template": "prompt_marker",
}


def flag(name):
    return "--" + name.replace("_", "-")


def hint(name, known):
    """The one-line error for an unknown setting `name` (underscored)."""
    ours = TUTORIAL_NAMES.get(name)
    if ours and ours != name and ours in known:
        return f"{flag(name)} is TrainingArguments' name; rawqlora's is {flag(ours)} (see --help)"
    if name.startswith("no_") and name[3:] in known:  # a setting that was on/off and now takes a value
        return f"{flag(name)} is not a flag; give {flag(name[3:])} a value (see --help)"
    return f"unknown option {flag(name)} (see --help)"


class _Parser(cli.ArgumentParser):
    def __init__(self, known, **kwargs):
        super().__init__(**kwargs)
        self.known = known

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            first = message.removeprefix("unrecognized arguments: ").split()[0]
            if first.startswith("--"):
                raise BadInput(hint(first[2:].split("=")[0].replace("-", "_"), self.known))
        super().error(message)


def parse(config_class, argv, choices, description, base=lambda given: {}):
    """The dataclass `config_class` from flags, a --config file and `base(given flags)`."""
    fields = [f for f in dataclasses.fields(config_class) if f.init and f.type is not dict]
    known = {f.name for f in fields}
    parser = _Parser(known, description=description, argument_default=None)
    for f in fields:
        if f.type is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag(f.name), type=f.type, choices=choices.get(f.name))
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    values = base(given)
    if given.get("config"):
        values.update(read_file(given["config"], known))
    values.update(given)
    types = {f.name: f.type for f in fields}
    return config_class(**{k: typed(k, v, types[k], choices) for k, v in values.items()})


def typed(name, value, kind, choices):
    """A config-file value as its field's type ("2e-4" -> 2e-4); argparse already typed the flags."""
    if kind is bool and not isinstance(value, bool):
        raise BadInput(f"{flag(name)}: expected true or false, got {value!r}")
    if kind is not bool:
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise BadInput(f"{flag(name)}: expected {kind.__name__}, got {value!r}") from None
    if name in choices and value not in choices[name]:
        raise BadInput(f"{flag(name)}: {value!r} is not one of {', '.join(choices[name])}")
    return value


def read_file(path, known):
    """The settings of a json or yaml file (keys may use - or _), checked against `known`."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml  # only for yaml files: a dependency of datasets, not of ours

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:  # json.JSONDecodeError or yaml.YAMLError: both mean a malformed file
        raise BadInput(f"--config {path}: cannot parse ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise BadInput(f"--config {path}: expected a mapping of option names to values")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BadInput(f"--config {path}: {hint(unknown[0], known)}")
    return values
