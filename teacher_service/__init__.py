"""Teacher-as-a-service: exact per-token teacher log-probabilities over gRPC.

The server (`teacher-service serve`) loads a local Hugging Face causal LM and scores token
sequences submitted by student trainers; `teacher_service.client.TeacherClient` is the
library trainers call it with.
"""

__version__ = "0.1.0"
