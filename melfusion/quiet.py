"""Keep stderr for what a user needs: library progress bars and notices ("Writing model shards",
"Loading pipeline components", the `torch_dtype` FutureWarning, accelerate's notices) say nothing to
someone generating a clip, and they bury the one line that matters."""

from __future__ import annotations

import logging
import warnings


def silence_library_noise() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
