"""Which tokenizer a run reads, and the error an entry point prints for a bad config value.

`config.release_dir` (a Hugging Face release directory, e.g. DeepSeek-V4-Flash as downloaded) supplies
`<release_dir>/tokenizer.json` and replaces `config.data.tokenizer_path`; without it the data section's
own `tokenizer_path` is read (the tiny config and the scaled twins ship the sample tokenizer; the
full-size configs have none, so a full-size run names one or the other). The chat template is the
release's encoding (data/chat_template.py), checked against the tokenizer when the encoder is built.
`resolve_tokenizer` runs once, after the command line is parsed and before anything is read.
"""

import os

import ml_collections

TOKENIZER_FILE = "tokenizer.json"


class ConfigError(ValueError):
    """A config value or command-line flag a run cannot use; the message names the flag."""


def resolve_tokenizer(config: ml_collections.ConfigDict) -> str:
    """Sets and returns `config.data.tokenizer_path` (see the module docstring); a missing directory
    or file is a ConfigError naming the flag that pointed at it."""
    release = config.get("release_dir")
    if release:
        if not os.path.isdir(release):
            raise ConfigError(f"--config.release_dir={release}: no such directory")
        path = os.path.join(release, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise ConfigError(
                f"--config.release_dir={release}: the release has no {TOKENIZER_FILE} "
                f"(or pass --config.data.tokenizer_path)"
            )
        config.data.tokenizer_path = path
        return path
    path = config.data.tokenizer_path
    if not path:
        raise ConfigError(
            "config.data.tokenizer_path is unset: pass --config.release_dir=<the Hugging Face "
            "release directory> or --config.data.tokenizer_path=<tokenizer.json>"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"--config.data.tokenizer_path={path}: no such file")
    return path
