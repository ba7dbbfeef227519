"""The minimum TFLite-metadata parser version of a metadata buffer, for MediaPipe's metadata writers.

MediaPipe's ``MetadataPopulator`` stamps each metadata buffer with the oldest parser able to read every field it
uses; it asks a compiled helper (``mediapipe.tasks.cc.metadata.python._pywrap_metadata_version``) that the PyPI
wheel of mediapipe 1.2 does not ship, so importing the writers fails. This module computes the same number from the
schema's rules (fields added after 1.0.0 and the version that added them; see ``metadata_schema.fbs``) and is
registered under the helper's name only when the real one is missing.
"""

from __future__ import annotations

import sys
import types

# Schema additions after 1.0.0 and the parser version that reads them.
_VOCABULARY_FILE = (1, 0, 1)
_SUBGRAPH_PROCESS_UNITS = (1, 1, 0)
_TOKENIZERS = (1, 1, 0)  # BERT and SentencePiece tokenizer options
_TENSOR_GROUPS = (1, 2, 0)
_REGEX_TOKENIZER = (1, 2, 1)
_AUDIO_PROPERTIES = (1, 3, 0)
_SCANN_INDEX_FILE = (1, 4, 0)
_FILE_VERSION = (1, 4, 1)
_CUSTOM_METADATA = (1, 5, 0)


def minimum_parser_version(buffer: bytes) -> str:
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    found = [(1, 0, 0)]

    def files(owner, n):
        for i in range(n):
            f = owner.AssociatedFiles(i)
            if f.Type() == fb.AssociatedFileType.VOCABULARY:
                found.append(_VOCABULARY_FILE)
            if f.Type() == fb.AssociatedFileType.SCANN_INDEX_FILE:
                found.append(_SCANN_INDEX_FILE)
            if f.Version() is not None:
                found.append(_FILE_VERSION)

    def units(get, n):
        for i in range(n):
            t = get(i).OptionsType()
            if t in (fb.ProcessUnitOptions.BertTokenizerOptions, fb.ProcessUnitOptions.SentencePieceTokenizerOptions):
                found.append(_TOKENIZERS)
            if t == fb.ProcessUnitOptions.RegexTokenizerOptions:
                found.append(_REGEX_TOKENIZER)

    def tensor(t):
        files(t, t.AssociatedFilesLength())
        units(t.ProcessUnits, t.ProcessUnitsLength())
        content = t.Content()
        if content is not None and content.ContentPropertiesType() == fb.ContentProperties.AudioProperties:
            found.append(_AUDIO_PROPERTIES)

    model = fb.ModelMetadata.GetRootAsModelMetadata(bytearray(buffer), 0)
    for s in range(model.SubgraphMetadataLength()):
        sub = model.SubgraphMetadata(s)
        for i in range(sub.InputTensorMetadataLength()):
            tensor(sub.InputTensorMetadata(i))
        for i in range(sub.OutputTensorMetadataLength()):
            tensor(sub.OutputTensorMetadata(i))
        files(sub, sub.AssociatedFilesLength())
        if not sub.InputProcessUnitsIsNone():
            found.append(_SUBGRAPH_PROCESS_UNITS)
            units(sub.InputProcessUnits, sub.InputProcessUnitsLength())
        if not sub.OutputProcessUnitsIsNone():
            found.append(_SUBGRAPH_PROCESS_UNITS)
            units(sub.OutputProcessUnits, sub.OutputProcessUnitsLength())
        if not (sub.InputTensorGroupsIsNone() and sub.OutputTensorGroupsIsNone()):
            found.append(_TENSOR_GROUPS)
        if not sub.CustomMetadataIsNone():
            found.append(_CUSTOM_METADATA)
    files(model, model.AssociatedFilesLength())
    return ".".join(map(str, max(found)))


def ensure_registered() -> None:
    """Make ``mediapipe.tasks.python.metadata`` importable when the wheel lacks its compiled version helper."""
    name = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"
    if name in sys.modules:
        return
    try:
        __import__(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    module.GetMinimumMetadataParserVersion = minimum_parser_version  # type: ignore[attr-defined]
    parts = name.split(".")
    for i in range(3, len(parts)):  # mediapipe.tasks.cc ... as empty packages, then the helper itself
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[name] = module
