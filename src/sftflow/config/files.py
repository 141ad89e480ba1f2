"""Config keys that name files transformers opens itself: checked first, so a wrong path is one line naming
the key rather than a FileNotFoundError traceback from inside `TrainingArguments`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftflow.errors import SftflowError

CONFIG_FILE_KEYS = {  # training keys whose string value transformers opens as a JSON file
    "accelerator_config": "a JSON file of Accelerator settings (or give them inline as a mapping)",
    "deepspeed": "a DeepSpeed JSON config (e.g. examples/deepspeed_z2.json)",
    "fsdp_config": "a JSON file of FSDP settings (or give them inline as a mapping)",
}


def check_config_files(user: dict[str, Any]) -> None:
    """The training keys that name a config file (`CONFIG_FILE_KEYS`) name one that exists, checked before
    transformers opens it (which would end in a FileNotFoundError traceback).

    Raises:
        SftflowError: naming the key, the path and what it should be.
    """
    for key, what in CONFIG_FILE_KEYS.items():
        value = user.get(key)
        if not isinstance(value, str) or not value.strip() or value.lstrip().startswith("{"):
            continue  # inline JSON / a mapping / unset
        path = Path(value).expanduser()
        if key == "deepspeed" and path.suffix.lower() != ".json":
            continue  # left to transformers and DeepSpeed, which read other forms too
        if not path.is_file():
            where = "is a directory" if path.is_dir() else "does not exist"
            raise SftflowError(
                f"{key}: {value} {where}. Give {what}; a relative path is read from the directory you run "
                f"sftflow in ({Path.cwd()})."
            )
