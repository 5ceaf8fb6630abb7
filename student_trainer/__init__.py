"""The student trainer: on-policy distillation (GKD) against the teacher service.

It imports teacher_client, its own modules, and of the service only its in-process entry
point (teacher_service.in_process; tests/test_imports.py holds it to that).

train.py       the loop (Algorithm 1): mixing, micro-batches, overlap with the teacher
step_guard.py  a step whose teacher fails is taken on no rank (rewind, put back, tell all)
teacher.py     the Teacher interface (submit_score -> future): the service or in-process
student.py     the student model and tokenizer, loaded from a directory or checkpoint
microbatch.py  what a micro-batch trains on: student samples, teacher outputs or answers
rollout_queue.py  steps built ahead (rollout.max_staleness), kept in checkpoints
rollouts.py    student sampling and the prompt / eos masking of training sequences
objective.py   teacher signal + student logits -> per-token losses: the run's Objective
               (teacher_client/objectives.py, chosen by method.loss) a chunk of rows at a time
losses.py      the divergences as pure tensor functions (from teacher_client/losses.py:
               generalized JSD, sparse support + tail, sampled-token reverse KL) and the
               token-level reduction
rows.py        StudentRows: the completion rows' logits and losses a chunk at a time
run_state.py   step, optimizer, schedule, random streams, data position: save and resume
checkpoint.py  checkpoint directories, written atomically
precision.py   student.autocast (bf16 / fp16); lora.py: student.lora (peft adapters)
distributed.py torchrun's world: shards, all-reduce, DDP
evaluate.py    task metrics and divergences to the teacher on held-out prompts
tasks.py       built-in tasks (datasets, metrics, rewards; records.py the data-to-text one);
               data.py encodes and streams them
user_data.py   task.name=file: the user's records; user_metric.py: task.metric
chat_template.py  the built-in models' chat template; padded_rows.py: suppress_tokens
metrics.py     metrics.jsonl and TensorBoard; prometheus_export.py: run.metrics_port
config.py      dataclass configs from YAML + --set; cli.py the `student-trainer` command

The demo, the paper table and the model-building tools live outside, in distill_lab/.
"""
