"""What train.py's loop is made of: data, loss, optimizer, checkpoints, data-parallel helpers,
activation checkpointing."""
