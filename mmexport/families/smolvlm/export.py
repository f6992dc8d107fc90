"""SmolVLM, export side: Idefics3's adapter (families/idefics3/export.py) with SmolVLM's transformers classes,
special tokens and chat template; the vision tower, connector, tiling and prompt expansion are the same code in
transformers."""
from __future__ import annotations

import contextlib
from pathlib import Path

from ..idefics3.export import IMAGE_TOKENS, Idefics3Adapter

# The chat template of HuggingFaceTB/SmolVLM-256M-Instruct / -500M-Instruct (transformers' SmolVLM
# DEFAULT_CHAT_TEMPLATE, which also accepts plain-string contents).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class SmolVLMAdapter(Idefics3Adapter):
    model_class = "SmolVLMForConditionalGeneration"
    config_class = "SmolVLMConfig"
    processor_class = "transformers:SmolVLMProcessor"
    image_processor_class = "transformers.models.smolvlm.image_processing_pil_smolvlm:SmolVLMImageProcessorPil"
    image_processor_save_class = image_processor_class
    special_tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS]
    bos, eos, pad = "<|im_start|>", ["<end_of_utterance>", "<|im_end|>"], "<|im_end|>"
    chat_template = CHAT_TEMPLATE

    def processor(self, model, model_dir: Path):
        """SmolVLMProcessor for images and text. It insists on num2words (for video prompts only) and a video
        processor (torchvision): neither is needed for images, so both checks are satisfied for its construction."""
        import transformers
        from transformers import AutoTokenizer
        from transformers.models.smolvlm import processing_smolvlm

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ip = self._load(self.image_processor_class).from_pretrained(model_dir, local_files_only=True)
        self._remember_tokens(tok)

        class ImagesOnly(transformers.SmolVLMProcessor):
            def check_argument_for_proper_class(self, name, arg):
                return None if arg is None and name == "video_processor" else super().check_argument_for_proper_class(name, arg)

        with _num2words_stand_in(processing_smolvlm):
            return ImagesOnly(image_processor=ip, tokenizer=tok, video_processor=None, image_seq_len=self._seq_len(model))

    @staticmethod
    def _seq_len(model) -> int:
        from ..idefics3.export import image_seq_len

        return image_seq_len(model.config)


@contextlib.contextmanager
def _num2words_stand_in(module):
    saved = module.num2words
    if saved is None:
        module.num2words = str  # only video prompts spell frame counts
    try:
        yield
    finally:
        module.num2words = saved
