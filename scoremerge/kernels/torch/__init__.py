"""The batched plain-torch backend: what `auto` runs on a CPU."""
