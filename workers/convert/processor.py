"""The converted model's processor: the vision tower's CLIP image processor, the language
model's tokenizer with an image token, and the LLaMA-3 chat template of LLaVA-LLaMA-3
models (the image before the text with a newline, as xtuner's LLaVA-LLaMA-3 has it).

The image token is the tokenizer's own where it has one. Where it has none, `<image>` is
added at an id the embedding already has a row for, so that no tensor changes: a row past
the tokenizer's last token where the embedding was padded, else the last of LLaMA-3's
unused reserved tokens (`<|reserved_special_token_N|>`), renamed. Original LLaVA never
looks its image token up in the embedding (it splices the image features in at id -200),
so the row it takes was unused.

torch and transformers are imported inside functions: the refusals that need only the
configs come first, before paying for them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from recap.errors import RecapError, describe
from workers.tiny_model import chat_template

IMAGE_TOKEN = "<image>"
RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")


@dataclass(frozen=True, slots=True)
class ImageToken:
    """The token that stands for each image feature in the prompt."""

    text: str
    id: int
    how: str  # "reused", "added" or "reserved slot <|reserved_special_token_N|>"


def load_tokenizer(folder: Path, label: str):
    """The language model's tokenizer as its tokenizer.json has it (a `llava_llama`
    config.json beside it would make AutoTokenizer fail: transformers does not know it)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if (folder / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise RecapError(f"{label}: cannot load its tokenizer: {describe(error, 300)}") from None


def image_token(tokenizer, embedding_rows: int) -> ImageToken:
    """The tokenizer's image token, added (see the module's note) where it has none."""
    own = getattr(tokenizer, "image_token", None)
    for text in (own, IMAGE_TOKEN):
        if text and _token_id(tokenizer, text) is not None:
            return _checked(ImageToken(text, _token_id(tokenizer, text), "reused"), embedding_rows)
    if len(tokenizer) < embedding_rows:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        return _checked(ImageToken(IMAGE_TOKEN, _token_id(tokenizer, IMAGE_TOKEN), "added"), embedding_rows)
    reserved = _free_reserved_token(tokenizer)
    if reserved is None:
        raise RecapError(
            f"the tokenizer has no image token, and the embedding ({embedding_rows} rows) has no unused "
            "row or reserved token to give one without changing a tensor"
        )
    _rename_token(tokenizer, reserved, IMAGE_TOKEN)
    return ImageToken(IMAGE_TOKEN, _token_id(tokenizer, IMAGE_TOKEN), f"reserved slot {reserved}")


def _token_id(tokenizer, text: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(text)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        return None
    return token_id


def _checked(token: ImageToken, embedding_rows: int) -> ImageToken:
    if token.id >= embedding_rows:
        raise RecapError(
            f"the image token {token.text} has id {token.id}, past the embedding's {embedding_rows} rows"
        )
    return token


def _free_reserved_token(tokenizer) -> str | None:
    """The highest-numbered reserved token that no role (pad, eos, ...) uses."""
    used = set(tokenizer.all_special_tokens)
    free = [
        (int(m.group(1)), t)
        for t in tokenizer.get_vocab()
        if (m := RESERVED.fullmatch(t)) is not None and t not in used
    ]
    return max(free)[1] if free else None


def _rename_token(tokenizer, old: str, new: str) -> None:
    """Rename an added token in the tokenizer's own definition (its id stays)."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    for added in data["added_tokens"]:
        if added["content"] == old:
            added["content"] = new
    vocab = data["model"].get("vocab")
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))  # transformers has no public setter


def image_processor(tower: Path, vision):
    """The tower's own CLIP image processor; where the tower has none, CLIP's defaults
    (resize the shorter side, centre crop, CLIP mean and std) at the tower's image size."""
    if (tower / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(tower)
    from transformers import CLIPImageProcessorPil

    side = vision.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def llava_processor(tokenizer, images, vision, strategy: str, token: ImageToken):
    """transformers' LlavaProcessor: it writes as many image tokens as the tower makes features."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        images,
        tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token ("default" drops it again)
        image_token=token.text,
        chat_template=chat_template(token.text + "\n"),
    )
