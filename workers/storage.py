"""``python -m llmmixer.workers.storage codec-server``, as the README documents it.

Payload storage and codecs live in ``llmmixer.runtime.storage`` (client and
worker share them) and the server in ``llmmixer.runtime.codec_server``; this
module only keeps the documented command working.
"""

from __future__ import annotations

import sys

from llmmixer.runtime.codec_server import codec_main

if __name__ == "__main__":
    sys.exit(codec_main())
