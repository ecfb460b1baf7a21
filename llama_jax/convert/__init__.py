"""Meta (and Hugging Face) LLaMA checkpoints -> our Orbax model folder, and back to Meta's or HF's layout.

Import is streamed, so peak host memory is about one layer, not the model:

    meta_source / hf_source   read a checkpoint a layer (or a block of embedding rows) at a time, in Meta's names
    importer                  maps each piece to our layout as LazyArray leaves and drives the conversion
    lazy_writer               writes those leaves block by block into ordinary Orbax arrays
    staging                   a temporary folder renamed at the end: no half-written output, ever
    export                    a model folder back to consolidated.NN.pth shards
    hf_export                 a model folder to a Hugging Face folder: sharded safetensors written a layer at a
                              time (safetensors_writer), config.json, and the tokenizer with its chat template
                              (hf_tokenizer)
    merge                     a base model folder plus a LoRA run's adapters, merged one stored tensor at a time
    meta_format, tensors, checklist, errors, progress: the pieces they share
"""

from llama_jax.convert.checklist import verify_checklist
from llama_jax.convert.errors import ConvertError
from llama_jax.convert.export import export_meta
from llama_jax.convert.hf_export import export_hf
from llama_jax.convert.hf_source import HFSource, permute_to_hf, unpermute_from_hf
from llama_jax.convert.importer import ConvertResult, convert, describe
from llama_jax.convert.lazy_writer import LazyArray, save_lazy_tree
from llama_jax.convert.merge import merge_adapter
from llama_jax.convert.meta_source import MetaSource, find_shards, load_shard
from llama_jax.convert.safetensors_writer import parse_size
from llama_jax.convert.tensors import to_numpy

__all__ = ["ConvertError", "ConvertResult", "LazyArray", "MetaSource", "HFSource", "convert", "export_hf",
           "export_meta", "verify_checklist", "find_shards", "load_shard", "save_lazy_tree", "unpermute_from_hf",
           "permute_to_hf", "describe", "to_numpy", "parse_size", "merge_adapter"]
