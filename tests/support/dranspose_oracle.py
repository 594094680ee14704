"""Run in dranspose's own venv (not ours): its Xspress decoder on a recording, as JSON on stdout.

``python dranspose_oracle.py < recording.cbors`` parses every message with
``dranspose.middlewares.xspress.parse`` (MAX IV's decoder, MIT, installed
from PyPI by the test into ``.venv-sims/dranspose``), joining the old
three-message form the way dranspose's ``ZmqSubXspressIngester`` does, and
prints per packet its htype, or for an image its frame number, per-channel
spectra sums and the scaler dict dranspose names. The test compares this
with our decoder's frames.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import cbor2
import numpy as np
from dranspose.data.xspress3 import XspressImage
from dranspose.event import StreamData
from dranspose.middlewares import xspress


def main() -> None:
    data = sys.stdin.buffer.read()
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream)
    messages = []
    while stream.tell() < len(data):
        messages.append(decoder.decode())
    out, k = [], 0
    while k < len(messages):
        parts = messages[k]
        if len(parts) == 1 and parts[0][:1] == b"{" and json.loads(parts[0]).get("htype") == "image":
            parts = parts + messages[k + 1] + messages[k + 2]  # the old form joined, as their ingester does
            k += 3
        else:
            k += 1
        with contextlib.redirect_stdout(io.StringIO()):  # parse prints each packet
            packet = xspress.parse(StreamData(typ="xspress", frames=parts))
        if isinstance(packet, XspressImage):
            out.append({"frame": packet.frame, "sums": packet.data.sum(axis=1).tolist(),
                        "meta": {name: np.asarray(v).tolist() for name, v in packet.meta.items()}})
        else:
            out.append({"htype": packet.htype})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
