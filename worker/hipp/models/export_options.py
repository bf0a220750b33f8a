"""Export options by name, torch-free, so the CLI's parser can offer them without importing torch.

``auto`` means the checkpoint's own dtype (see :mod:`worker.hipp.models.loading`). The service schema
(``app/schemas.py``) names the same choices; a test keeps the two equal.
"""

AUTO = "auto"
DTYPE_CHOICES = (AUTO, "float32", "bfloat16", "float16")
#: The hub's customary shard size: large exports come as several files a user can upload.
DEFAULT_MAX_SHARD_SIZE = "5GB"
