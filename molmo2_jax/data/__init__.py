"""Training data: Grain pipelines over TFDS (array_record) datasets and JSONL manifests, conversations to
tokens with Molmo2's loss weights, multimodal packing, and the built-in synthetic grounding set."""

from molmo2_jax.data.conversation import tokenize_conversation
from molmo2_jax.data.errors import BadExampleError, DataError, TooManyBadExamplesError
from molmo2_jax.data.manifest import ManifestSource
from molmo2_jax.data.packing import MODEL_KEYS, PackingConfig, PackIterDataset, assemble, fill_stats, vision_masks
from molmo2_jax.data.pipeline import PipelineConfig, Source, dataset, examples, records
from molmo2_jax.data.spm import model_token_settings, train_sentencepiece, write_tokenizer_dir
from molmo2_jax.data.synthetic import SyntheticConfig
from molmo2_jax.data.tfds_builder import build_synthetic, data_source, dataset_dir
from molmo2_jax.preprocessing.collate import Bucket

__all__ = [
    "BadExampleError", "Bucket", "DataError", "MODEL_KEYS", "ManifestSource", "PackIterDataset", "PackingConfig",
    "PipelineConfig", "Source", "SyntheticConfig", "TooManyBadExamplesError", "assemble", "build_synthetic",
    "data_source", "dataset", "dataset_dir", "examples", "fill_stats", "model_token_settings", "records",
    "tokenize_conversation", "train_sentencepiece", "vision_masks", "write_tokenizer_dir",
]
