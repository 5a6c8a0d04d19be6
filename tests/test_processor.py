"""Processor parity with transformers' Molmo2Processor (same tokenizer file), chat template, collate, errors."""

import numpy as np
import pytest
from ref_tokenizer import CONFIG_TOKEN_IDS, make_reference_processor, make_tokenizer_dir
from test_preprocessing_video import write_mp4

from molmo2_jax.preprocessing import (
    Bucket,
    BucketOverflowError,
    Molmo2Processor,
    PromptError,
    collate,
    decode_video,
    pick_bucket,
)

ONE_STEP = 2 / 255 + 1e-6


@pytest.fixture(scope="module", params=["qwen3", "olmo3"])
def procs(request, tmp_path_factory):
    d = make_tokenizer_dir(tmp_path_factory.mktemp(request.param), request.param, extra_words=["cat", "dog"])
    return request.param, make_reference_processor(d), Molmo2Processor.from_pretrained(d)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("vid") / "clip.mp4", 4, 6)


def _images(shapes, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, 256, (h, w, 3)).astype(np.uint8) for h, w in shapes]


def assert_same_outputs(ref_out, ours):
    assert set(ours) == set(ref_out)
    for key, expected in ref_out.items():
        assert ours[key].dtype == expected.dtype, key
        assert ours[key].shape == expected.shape, key
        if expected.dtype == np.float32:
            assert np.abs(ours[key] - expected).max() <= ONE_STEP, key
        else:
            np.testing.assert_array_equal(ours[key], expected, err_msg=key)


def test_single_image(procs):
    family, ref, ours = procs
    images = _images([(378, 378)])
    text = "<|image|>What is the cat doing?"
    out = ours(text, images=images)
    assert_same_outputs(ref(text=text, images=images, return_tensors="np"), out)
    assert out["input_ids"][0, 0] == CONFIG_TOKEN_IDS[family]["bos_token_id"]
    assert out["mm_token_type_ids"].sum() == 196 + 2 + 14 * 15 + 2  # low-res + high-res blocks


@pytest.mark.parametrize("n_images", [2, 3, 5])
def test_multi_image_batch(procs, n_images):
    _, ref, ours = procs
    shapes = [(300, 500), (90, 60), (700, 300), (378, 378), (1200, 1500)][:n_images]
    images = _images(shapes, seed=n_images)
    multi = "".join(f"Image {i + 1}<|image|>" for i in range(n_images - 1)) + " compare the dog"
    texts = [multi, "<|image|>and this one?"]  # images are consumed in placeholder order across texts
    ref_out = ref(text=texts, images=images, return_tensors="np", padding=True, max_crops=6)
    assert_same_outputs(ref_out, ours(texts, images=images, max_crops=6))
    assert_same_outputs(ref_out, ours(texts, images=[images[:-1], images[-1:]], max_crops=6))  # per-prompt lists


def test_video_from_path(procs, video_path):
    _, ref, ours = procs
    text = "<|video|>What happens?"
    out = ours(text, videos=[video_path])
    v = decode_video(video_path)  # same released sampling; the reference gets those frames
    meta = {"total_num_frames": len(v.frames), "fps": v.fps, "frames_indices": list(v.timestamps * v.fps)}
    ref_out = ref(text=text, videos=[v.frames], do_sample_frames=False, video_metadata=[meta], return_tensors="np")
    assert_same_outputs(ref_out, out)
    assert out["video_grids"].tolist() == [[9, 9, 9]]  # 4 s -> 0, 0.5, ..., 3.5, 4.0


@pytest.mark.parametrize("frame_special_tokens", [True, False])
def test_video_frame_tokens_follow_processor_config(tmp_path, frame_special_tokens):
    """`use_frame_special_tokens` in processor_config.json (false in the released Molmo2-4B/8B, true in
    Molmo2-8B-SFT) decides what wraps each frame, in both processors."""
    d = make_tokenizer_dir(tmp_path, "qwen3", use_frame_special_tokens=frame_special_tokens)
    ref, ours = make_reference_processor(d), Molmo2Processor.from_pretrained(d)
    frames = np.stack(_images([(40, 60)] * 3, seed=6))
    times = np.array([0.0, 0.5, 1.0])
    meta = {"total_num_frames": 3, "fps": 2.0, "frames_indices": [0, 1, 2]}
    out = ours("<|video|>Track it.", videos=[(frames, times)])
    assert_same_outputs(ref(text="<|video|>Track it.", videos=[frames], do_sample_frames=False,
                            video_metadata=[meta], return_tensors="np"), out)
    ids = CONFIG_TOKEN_IDS["qwen3"]
    start = ids["frame_start_token_id"] if frame_special_tokens else ids["image_start_token_id"]
    assert (out["input_ids"] == start).sum() == 3


@pytest.mark.parametrize("text", ["<|image|>and<|video|>Compare.", "<|video|>then<|image|>"])
def test_images_and_video_in_one_prompt_mark_the_video_patches(procs, text):
    """With both kinds in one call, `video_patch_mask` marks exactly the video's `<im_patch>` tokens, in the
    prompt's order of placeholders."""
    family, _, ours = procs
    image = _images([(200, 300)], seed=7)
    video = (np.stack(_images([(30, 30)] * 2, seed=8)), np.array([0.0, 0.5]))
    out = ours(text, images=image, videos=[video])
    patch = CONFIG_TOKEN_IDS[family]["image_patch_id"]
    n_image = int((ours("<|image|>", images=image)["input_ids"] == patch).sum())
    n_video = int((ours("<|video|>", videos=[video])["input_ids"] == patch).sum())
    flags = out["video_patch_mask"][0][out["input_ids"][0] == patch]
    video_first = text.startswith("<|video|>")
    expected = np.repeat([video_first, not video_first], [n_video, n_image] if video_first else [n_image, n_video])
    np.testing.assert_array_equal(flags, expected)
    assert out["video_patch_mask"][0][out["input_ids"][0] != patch].sum() == 0
    assert len(out["video_token_pooling"]) == n_video and len(out["image_token_pooling"]) == n_image


def test_long_video_from_bytes(procs, tmp_path):
    _, ref, ours = procs
    path = write_mp4(tmp_path / "long.mp4", 200, 1, size=16)  # > 191.5 s: uniform spacing
    out = ours("<|video|>Summarise", videos=[open(path, "rb").read()], num_frames=10)
    v = decode_video(path, num_frames=10)
    np.testing.assert_allclose(v.timestamps, np.linspace(0, 200, 10))
    meta = {"total_num_frames": 10, "fps": v.fps, "frames_indices": list(v.timestamps * v.fps)}
    ref_out = ref(text="<|video|>Summarise", videos=[v.frames], do_sample_frames=False, video_metadata=[meta],
                  return_tensors="np")
    assert_same_outputs(ref_out, out)


def test_frames_with_timestamps(procs):
    _, ref, ours = procs
    frames = _images([(40, 70)] * 4, seed=9)
    stack, times = np.stack(frames), np.array([0.0, 0.5, 1.25, 2.0])
    meta = {"total_num_frames": 4, "fps": 2.0, "frames_indices": list(times * 2.0)}
    ref_out = ref(text="Look <|video|>", videos=[stack], do_sample_frames=False, video_metadata=[meta],
                  return_tensors="np")
    assert_same_outputs(ref_out, ours("Look <|video|>", videos=[(stack, times)]))


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Point to the cat."}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                  {"type": "text", "text": "Which differs?", "style": "multi_image_mc"},
                                  {"type": "text", "text": "Answer briefly.", "style": "vqa2"}]}],
    [{"role": "subtitle", "content": "0.0-1.0: hello there\n"},
     {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is said?"}]},
     {"role": "assistant", "content": "hello there"},
     {"role": "user", "content": "And then?"}],
    [{"role": "user", "content": "Just text."}, {"role": "assistant", "content": "Sure."}],
]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_reference(procs, conv, generation_prompt):
    _, ref, ours = procs
    messages = CONVERSATIONS[conv]
    expected = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    prompt = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert prompt == expected
    ids = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    assert ids == ref.tokenizer(ref.tokenizer.bos_token + expected)["input_ids"]


def test_chat_template_rejects_bad_roles(procs):
    _, _, ours = procs
    with pytest.raises(PromptError, match="alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_reads_transformers_saved_layout(procs, tmp_path):
    family, ref, ours = procs
    d = make_tokenizer_dir(tmp_path / "t", family)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        (d / name).unlink()  # only the single processor_config.json transformers 5 writes
    loaded = Molmo2Processor.from_pretrained(d)
    assert loaded.image_config == ours.image_config
    assert loaded.video_config.pooling_size == (3, 3) and loaded.video_config.num_frames == 384


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"text": "<|video|><|video|>", "videos": ["a.mp4"]}, "2 <|video|> placeholder(s) but 1 video(s)"),
        ({"text": "<|image|>", "images": []}, "1 <|image|> placeholder(s) but 0 image(s)"),
        ({"text": ["<|video|><|video|>"], "videos": ["a.mp4", "b.mp4"]}, "at most one <|video|> per prompt"),
    ],
)
def test_placeholder_mismatch(procs, kwargs, message):
    _, _, ours = procs
    with pytest.raises(PromptError) as err:
        ours(**kwargs)
    assert message in str(err.value)


def test_missing_media_file_is_named(procs, tmp_path):
    _, _, ours = procs
    from molmo2_jax.preprocessing import ImageLoadError, VideoDecodeError

    with pytest.raises(ImageLoadError, match="nope.png"):
        ours("<|image|>", images=[str(tmp_path / "nope.png")])
    with pytest.raises(VideoDecodeError, match="nope.mp4"):
        ours("<|video|>", videos=[str(tmp_path / "nope.mp4")])
    with pytest.raises(VideoDecodeError, match="videos\\[0\\]: got 2 frames but 3 timestamps"):
        ours("<|video|>", videos=[(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(3))])


# ------------------------------------------------------------------------------------------------
# collate


@pytest.fixture(scope="module")
def examples(procs):
    _, _, ours = procs
    imgs = _images([(200, 300), (378, 378)], seed=4)
    frames = np.stack(_images([(30, 30)] * 2, seed=5))
    return [ours("<|image|>one", images=[imgs[0]]), ours("two", images=None),
            ours("<|image|>three", images=[imgs[1]]), ours("<|video|>four", videos=[(frames, np.array([0.0, 0.5]))])]


def test_collate_offsets_and_padding(procs, examples):
    family, _, _ = procs
    pad = CONFIG_TOKEN_IDS[family]["pad_token_id"]
    out = collate(examples, seq_len=1024, max_crops=8, max_image_tokens=1200, max_frames=4, max_video_tokens=200,
                  pad_token_id=pad)
    assert out["input_ids"].shape == (4, 1024) and out["pixel_values"].shape == (8, 729, 588)
    assert out["image_token_pooling"].shape == (1200, 4) and out["video_token_pooling"].shape == (200, 9)
    assert out["pixel_values_videos"].shape == (4, 729, 588)
    # left padding: tokens end-aligned, pads in front
    n0 = examples[0]["input_ids"].shape[1]
    np.testing.assert_array_equal(out["input_ids"][0, -n0:], examples[0]["input_ids"][0])
    assert (out["input_ids"][0, :-n0] == pad).all() and out["attention_mask"][0].sum() == n0
    # every pooled index still points at the same pixels after concatenation
    flat = out["pixel_values"].reshape(-1, 588)
    rows = 0
    for ex in (examples[0], examples[2]):
        own = ex["pixel_values"].reshape(-1, 588)
        pool = ex["image_token_pooling"]
        got = out["image_token_pooling"][rows : rows + len(pool)]
        valid = pool >= 0
        np.testing.assert_array_equal(flat[got[valid]], own[pool[valid]])
        rows += len(pool)
    assert (out["image_token_pooling"][rows:] == -1).all()
    assert (out["pixel_values"][examples[0]["pixel_values"].shape[0] + 2 :] == 0).all()
    assert out["image_grids"].shape == (2, 4) and out["video_grids"].tolist() == [[2, 9, 9]]
    # <im_patch> count == valid pooled rows, batch-wide
    patch = CONFIG_TOKEN_IDS[family]["image_patch_id"]
    n_img_tokens = sum(len(ex["image_token_pooling"]) for ex in (examples[0], examples[2]))
    assert (out["input_ids"] == patch).sum() == n_img_tokens + 2 * 81


def test_collate_empty_media_and_right_padding(examples):
    out = collate([examples[1]], seq_len=64, max_crops=2, max_image_tokens=8, max_frames=1, max_video_tokens=9,
                  pad_token_id=0, padding_side="right")
    assert out["pixel_values"].shape == (2, 729, 588) and not out["pixel_values"].any()
    assert (out["image_token_pooling"] == -1).all() and out["video_token_pooling"].shape == (9, 9)
    assert out["image_grids"].shape == (0, 4) and out["attention_mask"][0, 0] == 1


@pytest.mark.parametrize(
    "limits,message",
    [
        ({"seq_len": 10}, "examples[0] needs seq_len="),
        ({"max_crops": 3}, "the batch needs max_crops=4 (per example [2, 0, 2, 0]) but the bucket allows 3"),
        ({"max_image_tokens": 100}, "needs max_image_tokens="),
        ({"max_frames": 1}, "the batch needs max_frames=2 (per example [0, 0, 0, 2]) but the bucket allows 1"),
    ],
)
def test_collate_overflow_names_the_limit(examples, limits, message):
    kw = dict(seq_len=1024, max_crops=8, max_image_tokens=1200, max_frames=4, max_video_tokens=200, pad_token_id=0)
    with pytest.raises(BucketOverflowError) as err:
        collate(examples, **{**kw, **limits})
    assert message in str(err.value)


def test_pick_bucket(examples):
    small = Bucket(seq_len=512, max_crops=4, max_image_tokens=600, max_frames=0, max_video_tokens=0)
    big = Bucket(seq_len=1024, max_crops=8, max_image_tokens=1200, max_frames=4, max_video_tokens=200)
    assert pick_bucket([examples[1]], [big, small]) == small
    assert pick_bucket(examples, [small, big]) == big
    with pytest.raises(BucketOverflowError, match="no bucket fits"):
        pick_bucket(examples, [small])


def test_frame_array_with_fps_uses_released_index_rule(procs):
    _, ref, ours = procs
    frames = np.stack(_images([(24, 32)] * 7, seed=11))  # 7 frames at 6 fps -> indices 0, 3, 6
    out = ours("<|video|>", videos=[frames], video_fps=6.0)
    meta = {"total_num_frames": 3, "fps": 6.0, "frames_indices": [0, 3, 6]}
    ref_out = ref(text="<|video|>", videos=[frames[[0, 3, 6]]], do_sample_frames=False, video_metadata=[meta],
                  return_tensors="np")
    assert_same_outputs(ref_out, out)


# ------------------------------------------------------------------------------------------------
# tokenizer loading


def test_tokenizer_ids_come_from_the_checkpoint(procs):
    family, ref, ours = procs
    tok = ours.tokenizer
    ids = CONFIG_TOKEN_IDS[family]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"])
    assert tok.token_to_id("<frame_end>") == ids["frame_end_token_id"]
    text = "Héllo <|image|> wörld 0.5 <im_patch>\n"
    assert tok.encode(text) == ref.tokenizer(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_errors(tmp_path):
    from tokenizers import Tokenizer, models

    from molmo2_jax.preprocessing import Molmo2Tokenizer, TokenizerLoadError

    with pytest.raises(TokenizerLoadError, match="tokenizer path not found"):
        Molmo2Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json or sentencepiece"):
        Molmo2Tokenizer.from_pretrained(tmp_path)
    Tokenizer(models.WordLevel({"a": 0, "<|im_end|>": 1}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    with pytest.raises(TokenizerLoadError, match="lacks the Molmo2 special tokens"):
        Molmo2Tokenizer.from_pretrained(tmp_path)


def test_sentencepiece_model(tmp_path):
    import io
    import json

    import sentencepiece as spm

    from molmo2_jax.preprocessing import Molmo2Tokenizer

    corpus = ["the cat sat on the mat", "a dog ran in the park", "what is in the image"] * 30
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=50,
                                   model_type="bpe", user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                   minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    molmo = ["<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>", "<im_low>",
             "<frame_start>", "<frame_end>", "<|video|>"]
    (tmp_path / "added_tokens.json").write_text(json.dumps({t: 50 + i for i, t in enumerate(molmo)}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_end|>", "eos_token": "<|im_end|>"}))
    tok = Molmo2Tokenizer.from_pretrained(tmp_path)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert tok.eos_token_id == sp.piece_to_id("<|im_end|>") and tok.pad_token_id == tok.eos_token_id
    assert tok.encode("the cat<|image|>the dog") == sp.encode("the cat") + [55] + sp.encode("the dog")
    assert tok.decode(tok.encode("the cat<im_patch>"), skip_special_tokens=True) == "the cat"

    out = Molmo2Processor(tok)("<|image|>what is in the image", images=_images([(100, 100)]))
    assert out["input_ids"][0, 0] == tok.bos_token_id
    assert (out["input_ids"] == 52).sum() == len(out["image_token_pooling"])  # one <im_patch> per pooled token
