"""Training data (SPEC §8, §6, §2): records, the built-in synthetic multilingual set, manifest and tar readers,
the greedy task-language balancer and the pipeline that turns records into encoded examples.

    records = synthetic_records(512, seed=0, image_size=64)          # or read_manifest(...) / read_tar_shards(...)
    enc_tok, dec_tok = build_synthetic_tokenizers("runs/tok", records)
    pipeline = DataPipeline(records, enc_tok, dec_tok, image_size=64, seed=0)
    for ex in pipeline: ...                                           # EncodedExample, forever (epoch after epoch)
    state = pipeline.state_dict()                                     # JSON-serialisable; load_state_dict resumes

Modules (everything public is re-exported here: `from florenz_fast.data import DataPipeline`):
    records.py    Annotation, Record, EncodedExample, BadData, make_annotation / check_annotation (validation),
                  add_caption_prefix, DataStats (the skip/note/use counters), RecordList / RecordStream
    synthetic.py  the synthetic "shapes" set: scenes, the per-language grammar, rendering, synthetic_records,
                  tokenizer_corpus, build_synthetic_tokenizers
    readers.py    read_manifest (JSONL), read_tar_shards (WebDataset-style tar), load_record_image
    pipeline.py   GreedyBalancer, DataPipeline (seeded epoch order, balancing, prompts, tokenizing, resume; image
                  ids, the optional grouping sampler), record_image_ids

Vocabulary:
    record      one image with all its annotations (SPEC §8: several annotations per image)
    annotation  (task, target language, target text, source text for translation); its key "task-lang"
                ("caption-de", "translate-fr") is what the balancer equalises and the metrics group by
    visit       the pipeline reaching a record in its shuffled epoch order; one annotation is drawn per visit

Adding a data source: write a reader in readers.py (or a module of its own, re-exported here) and add it to
`data.source` in train.py's `_build_data`. A reader yields `Record(image, annotations, name)`: `image` a PIL
image, a path or the encoded file bytes (left undecoded: the pipeline decodes it on its first visit and
skips it if unreadable), `annotations` a list of Annotations built with `make_annotation` (which validates and
normalises task and language tags and raises BadData with a reason), `name` where the record came from for
error reports (file:line, shard:member). It counts what it drops in a DataStats (`stats.skip(reason, name,
detail)`) and returns it with the records: a RecordList (read at once) or a RecordStream (streamed), so the
pipeline's report includes the reader's skips.

Bad data is never fatal mid-run: readers skip malformed rows/members at read time, the pipeline drops invalid
annotations when it is built and unreadable images when it first visits them (and never retries them), and
every skip is counted by reason with the first few names (file:line, shard:member, record name) in
`DataStats.report()`. Over-long texts are not skipped: they are truncated to 128 tokens (SPEC §6) and noted.
"""

from .pipeline import DataPipeline, GreedyBalancer, record_image_ids
from .readers import IMAGE_EXTENSIONS, load_record_image, read_manifest, read_tar_shards
from .records import (
    CAPTION_TASKS,
    Annotation,
    BadData,
    DataStats,
    EncodedExample,
    Record,
    RecordList,
    RecordStream,
    add_caption_prefix,
    check_annotation,
    make_annotation,
)
from .synthetic import (
    BACKGROUNDS,
    COLOURS,
    REGIONS,
    SHAPES,
    SIZES,
    SYNTHETIC_LANGS,
    Scene,
    ShapeGroup,
    build_synthetic_tokenizers,
    describe_scene,
    noun_phrase,
    render_scene,
    sample_scene,
    synthetic_records,
    synthetic_scene,
    tokenizer_corpus,
)

__all__ = [
    "BACKGROUNDS", "CAPTION_TASKS", "COLOURS", "IMAGE_EXTENSIONS", "REGIONS", "SHAPES", "SIZES", "SYNTHETIC_LANGS",
    "Annotation", "BadData", "DataPipeline", "DataStats", "EncodedExample", "GreedyBalancer", "Record", "RecordList",
    "RecordStream", "Scene", "ShapeGroup", "add_caption_prefix", "build_synthetic_tokenizers", "check_annotation",
    "describe_scene", "load_record_image", "make_annotation", "noun_phrase", "read_manifest", "read_tar_shards",
    "record_image_ids",
    "render_scene", "sample_scene", "synthetic_records", "synthetic_scene", "tokenizer_corpus",
]
