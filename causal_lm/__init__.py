"""What running a causal LM takes, shared by the teacher service and the student trainer.

Neither owns it: the service's Generate and the student's rollouts draw with the one
sampler, the teacher's scoring and the student's loss apply the one output layer, and both
size torch's threads by one rule. It imports torch and transformers, never the service,
the trainer or the client (tests/test_imports.py).

Modules:
  sampling.py      KV-cache sampling (greedy, temperature, top-p) and a model's eos ids
  output_layer.py  the output layer as the model's forward applies it, on chosen rows
  placement.py     where a model computes: devices, accelerate's device maps
  threads.py       how many torch threads a process runs (CPUs, affinity, cgroup quota)
"""
