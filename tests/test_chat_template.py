"""The checkpoint's own chat template, rendered by our processor exactly as transformers' renders it.

Every case loads our `Molmo2Processor` and transformers' from the same directory. The two templates
below are written for these tests: QUIRKS behaves like the released Molmo2 template (a space
before every assistant turn taken from a message, an exception when roles do not alternate, a
`style` of None written "None: ", empty text parts counted when parts are joined); PLAIN is an
ordinary multi-line template that leans on trim_blocks / lstrip_blocks, loop controls and the
special-token variables.
"""

import json

import numpy as np
import pytest
from ref_tokenizer import make_reference_processor, make_tokenizer_dir

from molmo2_jax.preprocessing import Molmo2Processor, PromptError, TokenizerLoadError
from molmo2_jax.preprocessing.chat_template import DEMO_STYLES

QUIRKS = "{%- set plain_styles = " + json.dumps(sorted(DEMO_STYLES)) + " -%}\n" + r"""
{%- macro joined(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- set acc = namespace(text='') -%}
        {%- for part in content if part['type'] == 'text' -%}
            {%- if 'style' in part and part['style'] not in plain_styles -%}
                {%- set piece = part['style'] ~ ': ' ~ part['text'] -%}
            {%- else -%}
                {%- set piece = part['text'] ~ '' -%}
            {%- endif -%}
            {%- set acc.text = acc.text ~ (' ' if acc.text else '') ~ piece -%}
        {%- endfor -%}
        {{- acc.text -}}
    {%- endif -%}
{%- endmacro -%}
{%- set media = namespace(images=0, videos=0) -%}
{%- for message in messages if message['content'] is not string -%}
    {%- for part in message['content'] -%}
        {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
            {%- set media.images = media.images + 1 -%}
        {%- elif part['type'] == 'video' or 'video' in part or 'video_url' in part -%}
            {%- set media.videos = media.videos + 1 -%}
        {%- endif -%}
    {%- endfor -%}
{%- endfor -%}
{%- if media.images == 1 -%}
    <|image|>
{%- else -%}
    {%- for n in range(1, media.images + 1) -%}Image {{ n }}<|image|>{%- endfor -%}
{%- endif -%}
{{- '<|video|>' * media.videos -}}
{%- set skip = 1 if messages and (messages[0]['role'] | lower) == 'subtitle' else 0 -%}
{%- if skip -%}{{- messages[0]['content'] -}}{%- endif -%}
{%- for message in messages -%}
    {%- set role = message['role'] | lower -%}
    {%- if role == 'subtitle' -%}{%- continue -%}{%- endif -%}
    {%- set turn = loop.index0 - skip -%}
    {%- if role != ('user', 'assistant')[turn % 2] -%}
        {{- raise_exception('Roles must alternate user/assistant; message ' ~ loop.index0 ~ ' is ' ~ role) -}}
    {%- endif -%}
    {%- if role == 'user' -%}
        {{- ('<|im_end|>\n' if turn > 0 else '') ~ '<|im_start|>user\n'
            ~ joined(message['content']) ~ '<|im_end|>\n' -}}
    {%- else -%}
        {{- ' <|im_start|>assistant\n' ~ joined(message['content']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

PLAIN = """{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'subtitle' %}
        {% continue %}
    {% endif %}
<|im_start|>{{ message.role }}{% if message.name is defined %} ({{ message.name }}){% endif %}

    {% if message.content is string %}
{{ message.content }}
    {%- else %}
        {% for part in message.content %}
            {% if part.type == 'image' %}<|image|>{% elif part.type == 'video' %}<|video|>{% elif
                part.type == 'text' %}[{{ part.text }}]{% endif %}
        {% endfor %}
    {% endif %}
{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

TEMPLATES = {"quirks": QUIRKS, "plain": PLAIN}


def _text(text, **kw):
    return {"type": "text", "text": text, **kw}


CONVERSATIONS = {
    "one image": [{"role": "user", "content": [{"type": "image"}, _text("Point to the cat.")]}],
    "two images": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, _text("Which differs?")]}],
    "video": [{"role": "user", "content": [{"type": "video"}, _text("What happens?")]}],
    "two turns": [{"role": "user", "content": [{"type": "image"}, _text("What is this?")]},
                  {"role": "assistant", "content": "A cat."},
                  {"role": "user", "content": [_text("And the dog?")]}],
    "three turns": [{"role": "user", "content": "Count the dogs."}, {"role": "assistant", "content": "3"},
                    {"role": "user", "content": "And cats?"}, {"role": "assistant", "content": "2", "name": "bot"},
                    {"role": "user", "content": "Sure?"}],
    "string content": [{"role": "user", "content": "Just text."}],
    "two text parts": [{"role": "user", "content": [_text("First part."), _text("Second part.")]}],
    "demo and other style": [{"role": "user", "content": [_text("Point to the dog.", style="pointing"),
                                                          _text("Answer briefly.", style="vqa2")]}],
    "style None": [{"role": "user", "content": [_text("Describe.", style=None)]}],
    "empty text parts": [{"role": "user", "content": [_text(""), _text("a"), _text(""), _text("b")]}],
    "subtitle": [{"role": "subtitle", "content": "0.0-1.0: hello there\n"},
                 {"role": "user", "content": [{"type": "video"}, _text("What is said?")]},
                 {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "Then?"}],
    "openai image_url": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                                                      _text("What is it?")]}],
    "media object, None key": [{"role": "user", "name": None,
                                "content": [{"type": "image", "image": np.zeros((2, 2, 3), np.uint8)}, _text("Hm?")]}],
}


def _has_media(messages):
    return any(isinstance(m["content"], list) and any(p["type"] != "text" for p in m["content"]) for m in messages)


def _checkpoint(path, family, template=None, where="chat_template.jinja"):
    """A tiny checkpoint directory with `template` stored at `where` (or none at all)."""
    d = make_tokenizer_dir(path, family, extra_words=["cat", "dog"])
    (d / "chat_template.jinja").unlink()
    if template is not None:
        _store(d, template, where)
    return d


def _store(d, template, where):
    if where == "chat_template.jinja":
        (d / where).write_text(template)
    else:
        config = json.loads((d / where).read_text()) if (d / where).is_file() else {}
        (d / where).write_text(json.dumps({**config, "chat_template": template}))


@pytest.fixture(scope="module", params=["qwen3", "olmo3"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoints(family, tmp_path_factory):
    """Per template: (reference processor, our processor), both from one directory."""
    out = {}
    for name, template in TEMPLATES.items():
        d = _checkpoint(tmp_path_factory.mktemp(f"{family}-{name}"), family, template)
        out[name] = make_reference_processor(d), Molmo2Processor.from_pretrained(d)
    return out


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_matches_transformers(checkpoints, template, conversation, generation_prompt):
    ref, ours = checkpoints[template]
    messages = CONVERSATIONS[conversation]
    expected = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected
    if not _has_media(messages):  # with media the reference's ids need the pixels; the text is compared above
        ids = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        assert ids == ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)[0]


def test_quirks_are_rendered(checkpoints):
    """The cases above exercise what the released template does differently from a plain join."""
    ref, _ = checkpoints["quirks"]

    def render(name):
        return ref.apply_chat_template(CONVERSATIONS[name])

    assert " <|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\n" in render("two turns")
    assert "user\nNone: Describe.<|im_end|>" in render("style None")
    assert "user\na  b<|im_end|>" in render("empty text parts")
    assert "user\nPoint to the dog. vqa2: Answer briefly.<|im_end|>" in render("demo and other style")


BAD_ROLE_ORDERS = {
    "assistant first": [{"role": "assistant", "content": "Hi."}],
    "two users": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    # a subtitle after the first message is skipped but still counted when turns are numbered
    "subtitle later": [{"role": "user", "content": "a"}, {"role": "subtitle", "content": "s"},
                       {"role": "assistant", "content": "b"}],
}


@pytest.mark.parametrize("order", list(BAD_ROLE_ORDERS))
def test_bad_role_order_gives_the_templates_message(checkpoints, order):
    import jinja2

    ref, ours = checkpoints["quirks"]
    messages = BAD_ROLE_ORDERS[order]
    with pytest.raises(jinja2.TemplateError) as ref_err:
        ref.apply_chat_template(messages)
    with pytest.raises(PromptError) as err:
        ours.apply_chat_template(messages)
    message = str(err.value)
    assert str(ref_err.value) in message and "\n" not in message
    assert "chat_template.jinja" in message  # names the template that raised


# ------------------------------------------------------------------------------------------------
# A directory without a template: the built-in restatement of the released template


@pytest.fixture(scope="module")
def fallback(family, tmp_path_factory):
    return Molmo2Processor.from_pretrained(_checkpoint(tmp_path_factory.mktemp(f"{family}-none"), family))


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_fallback_renders_like_the_released_template(checkpoints, fallback, conversation, generation_prompt):
    ref, _ = checkpoints["quirks"]
    assert fallback.chat_template is None
    messages = CONVERSATIONS[conversation]
    expected = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert fallback.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected


@pytest.mark.parametrize("order", list(BAD_ROLE_ORDERS))
def test_fallback_rejects_bad_role_order(checkpoints, fallback, order):
    import jinja2

    with pytest.raises(jinja2.TemplateError):  # as the released template does
        checkpoints["quirks"][0].apply_chat_template(BAD_ROLE_ORDERS[order])
    with pytest.raises(PromptError) as err:
        fallback.apply_chat_template(BAD_ROLE_ORDERS[order])
    assert "roles must alternate" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# Where the template is found


def _reference_for(d, where):
    """transformers' renderer for a template at `where`: the processor, or for tokenizer_config.json
    (which the processor does not read) the tokenizer."""
    if where == "tokenizer_config.json":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(d))
    return make_reference_processor(d)


@pytest.mark.parametrize("where", ["chat_template.jinja", "processor_config.json", "chat_template.json",
                                   "tokenizer_config.json"])
def test_each_location_is_found(tmp_path, where):
    d = _checkpoint(tmp_path, "qwen3", PLAIN, where)
    ours = Molmo2Processor.from_pretrained(d)
    assert ours.chat_template.source == str(d / where)
    messages = CONVERSATIONS["three turns"]
    reference = _reference_for(d, where)
    assert ours.apply_chat_template(messages) == reference.apply_chat_template(messages, add_generation_prompt=True,
                                                                               tokenize=False)


@pytest.mark.parametrize("first,second", [("processor_config.json", "chat_template.jinja"),
                                          ("chat_template.jinja", "tokenizer_config.json")])
def test_location_precedence(tmp_path, first, second):
    d = _checkpoint(tmp_path, "qwen3", QUIRKS, first)
    _store(d, PLAIN, second)
    messages = CONVERSATIONS["two turns"]
    expected = make_reference_processor(d).apply_chat_template(messages, add_generation_prompt=True)
    assert Molmo2Processor.from_pretrained(d).apply_chat_template(messages) == expected
    assert expected.startswith("<|image|><|im_start|>user")  # QUIRKS, the template stored at `first`


def test_named_templates_render_the_default(tmp_path):
    d = _checkpoint(tmp_path, "qwen3", [{"name": "default", "template": PLAIN}, {"name": "other", "template": "x"}],
                    "tokenizer_config.json")
    messages = CONVERSATIONS["string content"]
    reference = _reference_for(d, "tokenizer_config.json")
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert Molmo2Processor.from_pretrained(d).apply_chat_template(messages) == expected


def test_transformers_template_helpers(tmp_path):
    template = ("{% generation %}{{ messages | tojson }}{% endgeneration %}|{{ strftime_now('%Y') }}|{{ tools }}|"
                "{{ documents }}|{{ bos_token }}{{ pad_token }}|{{ unk_token is defined }}|{{ mask_token }}")
    d = _checkpoint(tmp_path, "olmo3", template)
    messages = [{"role": "user", "content": [{"type": "image", "image": np.ones((2, 2, 3), np.uint8)},
                                             _text("é <|image|> & 'q' \"", score=np.float32(0.5))]}]
    expected = make_reference_processor(d).apply_chat_template(messages)
    assert Molmo2Processor.from_pretrained(d).apply_chat_template(messages, add_generation_prompt=False) == expected


def test_broken_template_is_named_at_load(tmp_path):
    d = _checkpoint(tmp_path, "qwen3", "{% for m in messages %}{{ m.role }")
    with pytest.raises(TokenizerLoadError) as err:
        Molmo2Processor.from_pretrained(d)
    message = str(err.value)
    assert message.startswith(f"{d / 'chat_template.jinja'}: bad chat template at line 1:") and "\n" not in message
