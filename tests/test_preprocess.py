import io

import numpy as np
import pytest
from PIL import Image

from derm.preprocess import ImageError, PreprocessSpec, load_image, preprocess


@pytest.fixture(scope="module")
def photo(pad_csv):
    """A real smartphone photo (PAD-UFES-20)."""
    import derm

    ds = derm.read_dataset(pad_csv)
    return Image.open(ds.paths[0]).convert("RGB")


def test_paths_bytes_pil_and_arrays_agree(photo, tmp_path):
    path = tmp_path / "p.png"
    photo.save(path)
    ref = preprocess(path, 64)
    assert ref.shape == (64, 64, 3) and ref.dtype == np.uint8
    assert (preprocess(path.read_bytes(), 64) == ref).all()
    assert (preprocess(photo, 64) == ref).all()
    assert (preprocess(np.asarray(photo), 64) == ref).all()
    assert np.abs(preprocess(np.asarray(photo) / 255.0, 64).astype(int) - ref).max() <= 1


def test_exif_orientation_is_applied(photo):
    small = photo.resize((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    small.save(buf, "JPEG", exif=exif, quality=95)
    upright = load_image(buf.getvalue())
    assert upright.size == (40, 60)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(photo, mode):
    im = photo.resize((50, 40))
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257)
    elif mode == "F":
        im = Image.fromarray(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
    else:
        im = im.convert(mode)
    out = preprocess(im, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16", "F"):
        gray = preprocess(photo.resize((50, 40)).convert("L"), 32)
        assert np.abs(out.astype(int) - gray.astype(int)).max() <= 2


def test_transparent_pixels_become_white():
    im = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert (preprocess(im, 4) == 255).all()


def test_tiny_and_huge(photo):
    assert preprocess(Image.new("RGB", (1, 1), (10, 20, 30)), 8).tolist() == [[[10, 20, 30]] * 8] * 8
    big = photo.resize((3000, 2000))
    out = preprocess(big, 64)
    ref = preprocess(photo.resize((300, 200)), 64)
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 6


def test_bad_files_name_themselves(tmp_path):
    txt = tmp_path / "notes.jpg"
    txt.write_text("hello")
    with pytest.raises(ImageError, match=r"notes\.jpg"):
        preprocess(txt)
    with pytest.raises(ImageError, match=r"not found: '.*missing\.png'"):
        preprocess(tmp_path / "missing.png")
    cut = tmp_path / "cut.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(buf, "JPEG")
    cut.write_bytes(buf.getvalue()[:400])
    with pytest.raises(ImageError, match=r"cut\.jpg"):
        preprocess(cut)
    with pytest.raises(ImageError, match=r"received shape \(4, 4, 2\)"):
        preprocess(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="received 0"):
        preprocess(Image.new("RGB", (4, 4)), 0)


def test_spec_is_serialisable():
    assert PreprocessSpec(size=128).to_dict()["size"] == 128


def test_edge_arrays_are_refused_and_big_photos_load_quietly(tmp_path):
    """An empty or NaN array never reaches a model; a 120-megapixel photo (under the documented 200 Mpx limit) loads
    without Pillow's decompression-bomb warning, and one over the limit is refused with the limit named."""
    import numpy as np
    import pytest
    from PIL import Image

    from derm.preprocess import MAX_PIXELS, ImageError, preprocess

    with pytest.raises(ImageError, match="no pixels"):
        preprocess(np.zeros((0, 0, 3), np.uint8), 16)
    with pytest.raises(ImageError, match="300 NaN or infinite"):
        preprocess(np.full((10, 10, 3), np.nan), 16)
    big = tmp_path / "big.png"
    Image.new("L", (12_000, 10_000)).save(big)  # 120 Mpx: Pillow alone warns from 89 Mpx
    assert preprocess(big, 16).shape == (16, 16, 3)  # warnings are errors in this suite
    huge = tmp_path / "huge.png"
    Image.new("1", (20_000, 10_001)).save(huge)  # 200,020,000 pixels, 1 bit each
    with pytest.raises(ImageError, match=f"{MAX_PIXELS:,}-pixel limit"):
        preprocess(huge, 16)
