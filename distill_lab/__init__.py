"""distill_lab: experiments and tools built on the trainer library, outside it: what the
project runs to show its results and to build the models its tasks start from (named
apart, so that it never shadows, or is shadowed by, a user's own `experiments` package).
A user's trainer imports student_trainer; nothing in student_trainer imports this package
except the `student-trainer pretrain` / `tiny-model` commands (cli.py), which front two of
its tools.

  demo.py         `make demo`: the service on loopback, on-policy distillation vs SFT
  paper_table/    the GKD paper's comparison on the built-in tasks (`make paper-table`);
                  report.py writes its tables and plots
  fair_table/     every method on records at its own sampling temperature, chosen on
                  validation (`make fair-table`)
  models.py       the built-in tasks' models: tokenizers, teachers and students trained by
                  SFT (`student-trainer pretrain`, `make models`)
  tiny_model.py   small random-weight Llama models and BPE tokenizers (tests, smoke runs)
"""
