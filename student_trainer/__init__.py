"""The student trainer: on-policy distillation (GKD) against the teacher service.

losses.py     divergences as pure tensor functions (generalized JSD, sparse support + tail,
              sampled-token reverse KL, token-level reduction)
rollouts.py   student sampling and the prompt / eos masking of training sequences
tasks.py      built-in tasks (datasets, metrics, rewards); data.py encodes and streams them
objective.py  teacher signal + student logits -> per-token losses
train.py      the loop (Algorithm 1): mixing, overlap with the teacher, checkpoints
metrics.py    metrics.jsonl and TensorBoard
evaluate.py   task metric and divergence to the teacher on held-out prompts
config.py     dataclass configs from YAML + --set; cli.py the `student-trainer` command
"""
