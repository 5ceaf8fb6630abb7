"""The student trainer: on-policy distillation (GKD) against the teacher service.

It imports teacher_client, its own modules, and of the service only its in-process entry
point (teacher_service.in_process; tests/test_imports.py holds it to that).

train.py       the loop (Algorithm 1): mixing, micro-batches, overlap with the teacher
teacher.py     the Teacher interface (submit_score -> future): the service or in-process
student.py     the student model and tokenizer, loaded from a directory or checkpoint
microbatch.py  what a micro-batch trains on: student samples, teacher outputs or answers
rollouts.py    student sampling and the prompt / eos masking of training sequences
objective.py   teacher signal + student logits -> per-token losses: the run's Objective
               (teacher_client/objectives.py, chosen by method.loss) a chunk of rows at a time
losses.py      the divergences as pure tensor functions (from teacher_client/losses.py:
               generalized JSD, sparse support + tail, sampled-token reverse KL) and the
               token-level reduction
run_state.py   step, optimizer, schedule, random streams, data position: save and resume
checkpoint.py  checkpoint directories, written atomically
distributed.py torchrun's world: shards, all-reduce, DDP
evaluate.py    task metrics and divergences to the teacher on held-out prompts
tasks.py       built-in tasks (datasets, metrics, rewards; records.py the data-to-text one);
               data.py encodes and streams them
models.py      the built-in tasks' models (pretrain); tiny_model.py small random ones
metrics.py     metrics.jsonl and TensorBoard
config.py      dataclass configs from YAML + --set; cli.py the `student-trainer` command
demo.py        `make demo`; paper_table/ and report.py the paper's comparison
"""
