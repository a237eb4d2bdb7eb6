"""Data for every stage: formats, sources, validation, tokenisation, collation and inspection.

Pure Python + torch + transformers tokenizers (+ ``datasets``/``pyarrow`` for those file
kinds, imported lazily). Never imports ray, vllm or deepspeed.

Typical use::

    from rlhf_ray.data import collate_sft, load_rows, load_tokenizer, pad_id, sft_examples, tokenize_sft

    tok = load_tokenizer(cfg.model.path)
    data = load_rows(cfg.data, split="train", tokenizer=tok)    # validated rows
    examples, stats = tokenize_sft(data.rows, tok, cfg.data.max_length,
                                   cfg.data.truncation, cfg.data.template)
    batch = collate_sft(examples[:8], pad_id(tok))

    # or, in one call (honours cfg.data.truncation and cfg.data.packing):
    examples, stats, data = sft_examples(cfg.data, tok, split="train")
"""

from rlhf_ray.data.builtin import BUILTINS, Builtin, generate, is_builtin, read_builtin
from rlhf_ray.data.checkers import (
    CHECKERS,
    Checker,
    check_arithmetic,
    check_counting,
    check_gsm8k,
    check_numeric,
    check_sorting,
    extract_list,
    extract_number,
)
from rlhf_ray.data.collate import (
    PackedExample,
    block_causal_mask,
    collate_packed,
    collate_preference,
    collate_prompts,
    collate_sft,
    pack_sft,
)
from rlhf_ray.data.formats import (
    FORMATS,
    ConversationRow,
    InstructionRow,
    Message,
    PreferenceRow,
    PromptRow,
    Row,
    RowError,
    parse_row,
    row_to_dict,
)
from rlhf_ray.data.load import (
    LoadedData,
    heldout_score,
    load_rows,
    preference_examples,
    prompt_examples,
    prompt_key,
    read_source,
    sft_examples,
    split_rows,
)
from rlhf_ray.data.sources import RawRecord, SourceInfo, read_file
from rlhf_ray.data.templates import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    TEMPLATES,
    alpaca_prompt,
    prompt_text,
    render_preference,
    render_sft,
)
from rlhf_ray.data.tokenize import (
    IGNORE_INDEX,
    PreferenceExample,
    PromptExample,
    SFTExample,
    TokenizeStats,
    eos_id,
    load_tokenizer,
    pad_id,
    row_lengths,
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
)
from rlhf_ray.data.validate import (
    DataError,
    Issue,
    ValidationReport,
    check_lengths,
    validate_records,
)

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "BUILTINS", "CHECKERS", "FORMATS", "IGNORE_INDEX",
    "TEMPLATES", "Builtin", "Checker", "ConversationRow", "DataError", "InstructionRow", "Issue",
    "LoadedData", "Message", "PackedExample", "PreferenceExample", "PreferenceRow", "PromptExample",
    "PromptRow", "RawRecord", "Row", "RowError", "SFTExample", "SourceInfo", "TokenizeStats",
    "ValidationReport", "alpaca_prompt", "block_causal_mask", "check_arithmetic", "check_counting",
    "check_gsm8k", "check_lengths", "check_numeric", "check_sorting", "collate_packed",
    "collate_preference", "collate_prompts", "collate_sft", "eos_id", "extract_list",
    "extract_number", "generate", "heldout_score", "is_builtin", "load_rows",
    "load_tokenizer", "pack_sft", "pad_id", "parse_row", "preference_examples", "prompt_examples",
    "prompt_key", "prompt_text", "sft_examples", "read_builtin",
    "read_file", "read_source", "render_preference", "render_sft", "row_lengths", "row_to_dict",
    "split_rows", "tokenize_preference", "tokenize_prompts", "tokenize_sft", "validate_records",
]
