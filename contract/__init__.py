"""What serving, training and evaluation must agree on, and nothing else: pure functions and
pydantic models, no I/O (tests/test_layers.py holds it to that).

- `prompt`: how a model is asked (renderings) and how its answer is read.
- `answer`: the parsed answer, the type reward terms score.
- `ranking`: the one first-k rule that turns an answer, scores or labels into the k ids shown.
- `candidates`: how candidates are ordered and filtered.
- `impression`: the record of a served list, written by the gateway and read by the trainer.
- `tasks`: what a model can be asked to do; its manifest lists the ones it was trained for.

Train/serve skew is this system's main risk: a change here reaches both sides at once.
"""
