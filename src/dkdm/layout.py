"""The names of the files a run directory and a model directory hold, in one place (docs/run-directory.md).

It imports nothing: every layer may use it.
"""

#: A run directory: its settings, its log (one JSON record a line) and its checkpoints.
RUN_JSON = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
#: A model directory: its description and its weights (a UNet also as a diffusers pipeline beside them).
MODEL_JSON = "dkdm_model.json"
WEIGHTS = "model.safetensors"
