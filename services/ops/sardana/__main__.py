"""``python -m services.ops.sardana``: the directories to put on a MacroServer's RecorderPath and MacroPath."""

from services.ops.sardana import MACRO_PATH, RECORDER_PATH

print(f"RecorderPath: {RECORDER_PATH}\nMacroPath:    {MACRO_PATH}")
