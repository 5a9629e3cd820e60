//! Data-input layer: ImageFolder and list-file datasets (and their error messages), image
//! decoding in every pixel mode, EXIF orientation, resize policies, hashes and atomic writes.
//! All images are generated here in temporary folders.
mod common;

use std::path::{Path, PathBuf};

use diffii::data::atomic::{encode_png, remove_stale_temps, save_png_atomic, write_atomic, write_json_atomic};
use diffii::data::dataset::Dataset;
use diffii::data::image::{
    load_for_model, load_rgb8, prepare, ResizePolicy,
};
use diffii::hash::{sha256_bytes, sha256_file};
use common::TempDir;
use image::{ImageBuffer, Luma, LumaA, Rgb, RgbImage, Rgba};


fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A small solid PNG (the colour makes files distinguishable when it matters).
fn png(path: &Path, colour: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(4, 3, Rgb(colour)).save(path).unwrap();
}

fn err_text<T: std::fmt::Debug>(r: diffii::error::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

/// Three classes, one of them with a single image; hidden and non-image files are ignored and
/// nested folders belong to their class.
fn make_folder(t: &TempDir) -> PathBuf {
    let root = t.join("ds");
    png(&root.join("cat/c2.png"), [1, 0, 0]);
    png(&root.join("cat/c1.png"), [2, 0, 0]);
    png(&root.join("cat/extra/c3.JPG"), [3, 0, 0]);
    png(&root.join("dog/only.png"), [4, 0, 0]);
    png(&root.join("bird/b1.jpeg"), [5, 0, 0]);
    png(&root.join("bird/b2.webp"), [6, 0, 0]);
    write(&root.join("bird/notes.txt"), b"not an image");
    write(&root.join("cat/.hidden.png"), b"skipped");
    write(&root.join(".DS_Store"), b"skipped");
    std::fs::create_dir_all(root.join(".cache/x")).unwrap();
    root
}

#[test]
fn image_folder_sorted_classes_and_items() {
    let t = TempDir::new("folder");
    let root = make_folder(&t);
    let ds = Dataset::image_folder(&root, None).unwrap();
    assert_eq!(ds.classes, ["bird", "cat", "dog"]);
    assert_eq!(ds.root, root);
    let rels: Vec<(&str, usize)> = ds.items.iter().map(|i| (i.rel.as_str(), i.class)).collect();
    assert_eq!(
        rels,
        [
            ("bird/b1.jpeg", 0),
            ("bird/b2.webp", 0),
            ("cat/c1.png", 1),
            ("cat/c2.png", 1),
            ("cat/extra/c3.JPG", 1),
            ("dog/only.png", 2),
        ]
    );
    assert_eq!(ds.class_counts(), [2, 3, 1]);
    assert_eq!(ds.items[2].path, root.join("cat/c1.png"));
    let dogs = ds.class_items(2);
    assert_eq!(dogs.len(), 1);
    assert_eq!(dogs[0].rel, "dog/only.png");
    assert!(ds.class_items(7).is_empty());
    // open() dispatches a folder to image_folder.
    assert_eq!(Dataset::open(&root, None).unwrap(), ds);
}

#[test]
fn image_folder_class_names_file_sets_order() {
    let t = TempDir::new("names");
    let root = make_folder(&t);
    let names = t.join("classes.txt");
    write(&names, b"# my classes\ndog\n\n  cat  \r\nbird\n");
    let ds = Dataset::image_folder(&root, Some(&names)).unwrap();
    assert_eq!(ds.classes, ["dog", "cat", "bird"]);
    assert_eq!(ds.class_counts(), [1, 3, 2]);
    assert_eq!(ds.items[0].rel, "dog/only.png");
    assert_eq!(ds.items[0].class, 0);
    assert_eq!(ds.items.last().unwrap().rel, "bird/b2.webp");
}

#[test]
fn image_folder_errors() {
    let t = TempDir::new("folder-err");
    let root = make_folder(&t);

    // Names file that misses a folder.
    let names = t.join("two.txt");
    write(&names, b"cat\nbird\n");
    let e = err_text(Dataset::image_folder(&root, Some(&names)));
    assert!(
        e.contains("two.txt") && e.contains("`dog`") && e.contains("not listed"),
        "{e}"
    );

    // Names file that lists a class without a folder.
    let names = t.join("four.txt");
    write(&names, b"cat\nbird\ndog\nfish\n");
    let e = err_text(Dataset::image_folder(&root, Some(&names)));
    assert!(
        e.contains("four.txt") && e.contains("`fish`") && e.contains("no folder"),
        "{e}"
    );

    // Duplicate class name.
    let names = t.join("dup.txt");
    write(&names, b"cat\nbird\n\ncat\ndog\n");
    let e = err_text(Dataset::image_folder(&root, Some(&names)));
    assert!(
        e.contains("dup.txt") && e.contains("line 4") && e.contains("line 1"),
        "{e}"
    );
    assert!(e.contains("duplicate class name `cat`"), "{e}");

    // Empty names file.
    let names = t.join("empty.txt");
    write(&names, b"# nothing\n\n");
    let e = err_text(Dataset::image_folder(&root, Some(&names)));
    assert!(
        e.contains("empty.txt") && e.contains("no class names"),
        "{e}"
    );

    // A class folder with no images (only a non-image and a hidden image).
    std::fs::create_dir_all(root.join("fish")).unwrap();
    write(&root.join("fish/readme.md"), b"x");
    write(&root.join("fish/.x.png"), b"x");
    let e = err_text(Dataset::image_folder(&root, None));
    assert!(
        e.contains("`fish`") && e.contains("no images") && e.contains("ds"),
        "{e}"
    );

    // Missing root.
    let e = err_text(Dataset::image_folder(t.join("nope"), None));
    assert!(e.contains("nope") && e.contains("not found"), "{e}");
    let e = err_text(Dataset::open(t.join("nope2"), None));
    assert!(e.contains("nope2") && e.contains("not found"), "{e}");

    // Empty dataset folder.
    std::fs::create_dir_all(t.join("empty")).unwrap();
    let e = err_text(Dataset::image_folder(t.join("empty"), None));
    assert!(e.contains("empty") && e.contains("no class folders"), "{e}");

    // Images directly in the root.
    png(&t.join("flat/a.png"), [0, 0, 0]);
    let e = err_text(Dataset::image_folder(t.join("flat"), None));
    assert!(e.contains("flat") && e.contains("directly"), "{e}");

    // A file given as folder.
    let e = err_text(Dataset::image_folder(t.join("two.txt"), None));
    assert!(e.contains("two.txt") && e.contains("not a folder"), "{e}");
}

fn make_list_images(t: &TempDir) {
    png(&t.join("data/imgs/a 1.png"), [1, 1, 1]);
    png(&t.join("data/imgs/b.png"), [2, 2, 2]);
    png(&t.join("data/imgs/c.jpg"), [3, 3, 3]);
    png(&t.join("data/more/d.png"), [4, 4, 4]);
}

#[test]
fn list_file_with_names() {
    let t = TempDir::new("list");
    make_list_images(&t);
    let list = t.join("data/train.txt");
    write(
        &list,
        b"# path label\nimgs/a 1.png   zebra\n./imgs/b.png ant\n\nimgs/c.jpg\tzebra\r\nmore/d.png ant\n",
    );
    let ds = Dataset::list_file(&list, None).unwrap();
    assert_eq!(ds.classes, ["ant", "zebra"]);
    assert_eq!(ds.root, t.join("data"));
    let rels: Vec<(&str, usize)> = ds.items.iter().map(|i| (i.rel.as_str(), i.class)).collect();
    assert_eq!(
        rels,
        [
            ("imgs/b.png", 0),
            ("more/d.png", 0),
            ("imgs/a 1.png", 1),
            ("imgs/c.jpg", 1)
        ]
    );
    assert_eq!(ds.items[2].path, t.join("data/imgs/a 1.png"));
    assert!(ds.items[2].path.is_file());
    // open() dispatches a file to list_file.
    assert_eq!(Dataset::open(&list, None).unwrap(), ds);
}

#[test]
fn list_file_with_indices_and_names_file() {
    let t = TempDir::new("list-idx");
    make_list_images(&t);
    let names = t.join("names.txt");
    write(&names, b"zebra\nant\n");
    let list = t.join("data/train.txt");
    // Indices and names may be mixed; indices refer to the names file.
    write(
        &list,
        b"imgs/a 1.png 0\nimgs/b.png 1\nimgs/c.jpg zebra\nmore/d.png 1\n",
    );
    let ds = Dataset::list_file(&list, Some(&names)).unwrap();
    assert_eq!(ds.classes, ["zebra", "ant"]);
    let rels: Vec<(&str, usize)> = ds.items.iter().map(|i| (i.rel.as_str(), i.class)).collect();
    assert_eq!(
        rels,
        [
            ("imgs/a 1.png", 0),
            ("imgs/c.jpg", 0),
            ("imgs/b.png", 1),
            ("more/d.png", 1)
        ]
    );
}

#[test]
fn list_file_numeric_labels_sort_by_value() {
    let t = TempDir::new("list-num");
    make_list_images(&t);
    let list = t.join("data/train.txt");
    write(
        &list,
        b"imgs/a 1.png 10\nimgs/b.png 2\nimgs/c.jpg 2\nmore/d.png 1\n",
    );
    let ds = Dataset::list_file(&list, None).unwrap();
    assert_eq!(ds.classes, ["1", "2", "10"]);
    assert_eq!(ds.class_counts(), [1, 2, 1]);
}

#[test]
fn list_file_errors() {
    let t = TempDir::new("list-err");
    make_list_images(&t);
    let names = t.join("names.txt");
    write(&names, b"zebra\nant\n");
    let list = t.join("data/bad.txt");

    write(&list, b"imgs/b.png ant\n# c\nimgs/c.jpg horse\n");
    let e = err_text(Dataset::list_file(&list, Some(&names)));
    assert!(
        e.contains("bad.txt") && e.contains("line 3") && e.contains("unknown label `horse`"),
        "{e}"
    );

    write(&list, b"imgs/b.png 1\nimgs/c.jpg 2\n");
    let e = err_text(Dataset::list_file(&list, Some(&names)));
    assert!(
        e.contains("bad.txt") && e.contains("line 2") && e.contains("out of range"),
        "{e}"
    );

    write(
        &list,
        b"imgs/b.png ant\n\nimgs/missing.png ant\nimgs/c.jpg zebra\n",
    );
    let e = err_text(Dataset::list_file(&list, None));
    assert!(
        e.contains("bad.txt") && e.contains("line 3") && e.contains("missing.png"),
        "{e}"
    );
    assert!(e.contains("not found"), "{e}");

    write(&list, b"imgs/b.png ant\nimgs/c.jpg\n");
    let e = err_text(Dataset::list_file(&list, None));
    assert!(
        e.contains("bad.txt") && e.contains("line 2") && e.contains("no label"),
        "{e}"
    );

    write(
        &list,
        b"imgs/b.png ant\nimgs/c.jpg zebra\n./imgs/b.png ant\n",
    );
    let e = err_text(Dataset::list_file(&list, None));
    assert!(
        e.contains("bad.txt") && e.contains("line 3") && e.contains("line 1"),
        "{e}"
    );

    write(&list, b"# only comments\n\n");
    let e = err_text(Dataset::list_file(&list, None));
    assert!(e.contains("bad.txt") && e.contains("no entries"), "{e}");

    // A class of the names file with no image in the list.
    write(&list, b"imgs/b.png ant\n");
    let e = err_text(Dataset::list_file(&list, Some(&names)));
    assert!(
        e.contains("bad.txt") && e.contains("`zebra`") && e.contains("no images"),
        "{e}"
    );

    // Numeric class names that disagree with their index.
    let num = t.join("num.txt");
    write(&num, b"1\n0\n");
    write(&list, b"imgs/b.png 0\nimgs/c.jpg 1\n");
    let e = err_text(Dataset::list_file(&list, Some(&num)));
    assert!(
        e.contains("bad.txt") && e.contains("line 1") && e.contains("ambiguous"),
        "{e}"
    );

    // A label that cannot be a folder name.
    write(&list, b"imgs/b.png a/b\n");
    let e = err_text(Dataset::list_file(&list, None));
    assert!(
        e.contains("bad.txt") && e.contains("line 1") && e.contains("a/b"),
        "{e}"
    );

    let e = err_text(Dataset::list_file(t.join("data/none.txt"), None));
    assert!(e.contains("none.txt"), "{e}");
}

// ---------------------------------------------------------------- decoding

fn px(img: &RgbImage, x: u32, y: u32) -> [u8; 3] {
    img.get_pixel(x, y).0
}

#[test]
fn decode_grey_and_alpha_modes() {
    let t = TempDir::new("decode");
    let p = t.join("grey.png");
    ImageBuffer::from_fn(2, 1, |x, _| Luma([if x == 0 { 77u8 } else { 200 }]))
        .save(&p)
        .unwrap();
    let img = load_rgb8(&p).unwrap();
    assert_eq!((px(&img, 0, 0), px(&img, 1, 0)), ([77; 3], [200; 3]));

    // Alpha is dropped, never composited: colour under alpha 0 survives.
    let p = t.join("grey_alpha.png");
    ImageBuffer::from_fn(2, 1, |x, _| {
        LumaA([if x == 0 { 77u8 } else { 200 }, x as u8 * 100])
    })
    .save(&p)
    .unwrap();
    let img = load_rgb8(&p).unwrap();
    assert_eq!((px(&img, 0, 0), px(&img, 1, 0)), ([77; 3], [200; 3]));

    let p = t.join("rgba.png");
    let rgba = ImageBuffer::from_fn(2, 1, |x, _| {
        if x == 0 {
            Rgba([10u8, 20, 30, 0])
        } else {
            Rgba([200, 100, 50, 128])
        }
    });
    rgba.save(&p).unwrap();
    let img = load_rgb8(&p).unwrap();
    assert_eq!(
        (px(&img, 0, 0), px(&img, 1, 0)),
        ([10, 20, 30], [200, 100, 50])
    );
}

/// 16-bit samples keep their high byte, as PIL does for 16-bit RGB(A) PNGs (not the rounding
/// `(v + 128) / 257` of the image crate, which would give 1 for 255).
#[test]
fn decode_16_bit_truncates_to_high_byte() {
    let t = TempDir::new("decode16");
    let vals: [u16; 5] = [65535, 32896, 32767, 255, 0];
    let want: [u8; 5] = [255, 128, 127, 0, 0];

    let p = t.join("rgb16.png");
    ImageBuffer::from_fn(5, 1, |x, _| {
        let v = vals[x as usize];
        Rgb([v, v / 2, 65535 - v])
    })
    .save(&p)
    .unwrap();
    let img = load_rgb8(&p).unwrap();
    for (x, (&v, &w)) in vals.iter().zip(&want).enumerate() {
        assert_eq!(
            px(&img, x as u32, 0),
            [w, ((v / 2) >> 8) as u8, ((65535 - v) >> 8) as u8]
        );
    }

    let p = t.join("rgba16.png");
    ImageBuffer::from_fn(5, 1, |x, _| Rgba([vals[x as usize], 0, 0, 0u16]))
        .save(&p)
        .unwrap();
    let img = load_rgb8(&p).unwrap();
    for (x, &w) in want.iter().enumerate() {
        assert_eq!(px(&img, x as u32, 0), [w, 0, 0]);
    }

    for (name, la) in [("grey16.png", false), ("grey_alpha16.png", true)] {
        let p = t.join(name);
        if la {
            ImageBuffer::from_fn(5, 1, |x, _| LumaA([vals[x as usize], 1000u16]))
                .save(&p)
                .unwrap();
        } else {
            ImageBuffer::from_fn(5, 1, |x, _| Luma([vals[x as usize]]))
                .save(&p)
                .unwrap();
        }
        let img = load_rgb8(&p).unwrap();
        for (x, &w) in want.iter().enumerate() {
            assert_eq!(px(&img, x as u32, 0), [w; 3], "{name} x={x}");
        }
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn chunk(out: &mut Vec<u8>, ty: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut td = ty.to_vec();
    td.extend(data);
    out.extend(&td);
    out.extend(crc32(&td).to_be_bytes());
}

/// zlib stream with one stored (uncompressed) block.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    let len = data.len() as u16;
    let mut out = vec![0x78, 0x01, 0x01];
    out.extend(len.to_le_bytes());
    out.extend((!len).to_le_bytes());
    out.extend(data);
    out.extend(((b << 16) | a).to_be_bytes());
    out
}

#[test]
fn decode_palette_with_transparency() {
    let t = TempDir::new("palette");
    let mut f = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(3u32.to_be_bytes());
    ihdr.extend(1u32.to_be_bytes());
    ihdr.extend([8, 3, 0, 0, 0]); // 8-bit palette
    chunk(&mut f, b"IHDR", &ihdr);
    chunk(&mut f, b"PLTE", &[255, 0, 0, 0, 0, 255, 9, 8, 7]);
    chunk(&mut f, b"tRNS", &[0, 128]); // entry 0 fully transparent
    chunk(&mut f, b"IDAT", &zlib_stored(&[0, 0, 1, 2]));
    chunk(&mut f, b"IEND", &[]);
    let p = t.join("palette.png");
    write(&p, &f);
    let img = load_rgb8(&p).unwrap();
    assert_eq!(img.dimensions(), (3, 1));
    assert_eq!(
        [px(&img, 0, 0), px(&img, 1, 0), px(&img, 2, 0)],
        [[255, 0, 0], [0, 0, 255], [9, 8, 7]]
    );
}

/// A JPEG whose top-left 16x16 block is red and the rest blue, 64x32 as stored, with an EXIF
/// APP1 segment carrying `orientation`.
fn jpeg_with_orientation(orientation: Option<u16>) -> Vec<u8> {
    let img = RgbImage::from_fn(64, 32, |x, y| {
        if x < 16 && y < 16 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 95)
        .encode_image(&img)
        .unwrap();
    let Some(o) = orientation else { return jpg };
    // TIFF header (little endian), one IFD entry: Orientation (0x0112), SHORT, count 1.
    let mut tiff = b"II*\0".to_vec();
    tiff.extend(8u32.to_le_bytes());
    tiff.extend(1u16.to_le_bytes());
    tiff.extend(0x0112u16.to_le_bytes());
    tiff.extend(3u16.to_le_bytes());
    tiff.extend(1u32.to_le_bytes());
    tiff.extend(o.to_le_bytes());
    tiff.extend([0, 0]);
    tiff.extend(0u32.to_le_bytes());
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend(tiff);
    let mut app1 = vec![0xFF, 0xE1];
    app1.extend(((payload.len() + 2) as u16).to_be_bytes());
    app1.extend(payload);
    assert_eq!(&jpg[..2], &[0xFF, 0xD8]);
    let mut out = jpg[..2].to_vec();
    out.extend(app1);
    out.extend(&jpg[2..]);
    out
}

fn is_red(p: [u8; 3]) -> bool {
    p[0] > 200 && p[1] < 60 && p[2] < 60
}
fn is_blue(p: [u8; 3]) -> bool {
    p[2] > 200 && p[0] < 60 && p[1] < 60
}

#[test]
fn jpeg_exif_orientation_applied() {
    let t = TempDir::new("exif");
    let p = t.join("plain.jpg");
    write(&p, &jpeg_with_orientation(None));
    let img = load_rgb8(&p).unwrap();
    assert_eq!(img.dimensions(), (64, 32));
    assert!(is_red(px(&img, 8, 8)) && is_blue(px(&img, 40, 8)));

    // Orientation 6: display = stored rotated 90 degrees clockwise, so the stored top-left block
    // ends up top-right and width/height swap. (Transpose would put it top-left, a
    // counter-clockwise turn bottom-left.)
    let p = t.join("rot6.jpg");
    write(&p, &jpeg_with_orientation(Some(6)));
    let img = load_rgb8(&p).unwrap();
    assert_eq!(img.dimensions(), (32, 64));
    assert!(is_red(px(&img, 24, 8)), "{:?}", px(&img, 24, 8));
    assert!(is_blue(px(&img, 8, 8)), "{:?}", px(&img, 8, 8));
    assert!(is_blue(px(&img, 8, 56)), "{:?}", px(&img, 8, 56));
    assert!(is_blue(px(&img, 24, 56)), "{:?}", px(&img, 24, 56));

    // Format is detected from content: a JPEG named .png still decodes.
    let p = t.join("actually_jpeg.png");
    write(&p, &jpeg_with_orientation(Some(6)));
    assert_eq!(load_rgb8(&p).unwrap().dimensions(), (32, 64));
}

#[test]
fn corrupt_files_error_with_their_name() {
    let t = TempDir::new("corrupt");
    let p = t.join("garbage.png");
    write(&p, b"this is not an image at all");
    let e = err_text(load_rgb8(&p));
    assert!(
        e.contains("garbage.png") && e.contains("not a recognised image"),
        "{e}"
    );

    let good = t.join("good.png");
    RgbImage::from_pixel(32, 32, Rgb([1, 2, 3]))
        .save(&good)
        .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let p = t.join("truncated.png");
    write(&p, &bytes[..bytes.len() / 2]);
    let e = err_text(load_rgb8(&p));
    assert!(
        e.contains("truncated.png") && e.contains("cannot decode"),
        "{e}"
    );
    let e = err_text(load_for_model(&p, 8, ResizePolicy::Squash));
    assert!(e.contains("truncated.png"), "{e}");

    let jpg = jpeg_with_orientation(None);
    let p = t.join("truncated.jpg");
    write(&p, &jpg[..jpg.len() / 3]);
    let e = err_text(load_rgb8(&p));
    assert!(e.contains("truncated.jpg"), "{e}");

    let e = err_text(load_rgb8(t.join("absent.png")));
    assert!(e.contains("absent.png"), "{e}");
}

// ---------------------------------------------------------------- resizing

/// 64x32: left quarter red, middle half green, right quarter blue.
fn bands(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, _| {
        if x < w / 4 {
            Rgb([255, 0, 0])
        } else if x < 3 * w / 4 {
            Rgb([0, 255, 0])
        } else {
            Rgb([0, 0, 255])
        }
    })
}

fn is_green(p: [u8; 3]) -> bool {
    p[1] > 200 && p[0] < 60 && p[2] < 60
}

#[test]
fn resize_policies() {
    let img = bands(64, 32);

    let sq = prepare(&img, 32, ResizePolicy::Squash);
    assert_eq!(sq.dimensions(), (32, 32));
    assert!(is_red(px(&sq, 2, 16)) && is_green(px(&sq, 16, 16)) && is_blue(px(&sq, 29, 16)));

    // The short side is already 32: a pure crop of the middle, i.e. all green.
    let cc = prepare(&img, 32, ResizePolicy::CenterCrop);
    assert_eq!(cc.dimensions(), (32, 32));
    assert!(cc.pixels().all(|p| p.0 == [0, 255, 0]));

    // Resize (128x64 -> 64x32) then crop: centre kept, the red and blue sides are gone.
    let cc = prepare(&bands(128, 64), 32, ResizePolicy::CenterCrop);
    assert_eq!(cc.dimensions(), (32, 32));
    for x in [4, 16, 27] {
        assert!(is_green(px(&cc, x, 16)), "x={x}: {:?}", px(&cc, x, 16));
    }

    // Portrait input crops vertically.
    let tall = RgbImage::from_fn(20, 50, |_, y| {
        if (15..35).contains(&y) {
            Rgb([0, 255, 0])
        } else {
            Rgb([255, 0, 0])
        }
    });
    let cc = prepare(&tall, 20, ResizePolicy::CenterCrop);
    assert_eq!(cc.dimensions(), (20, 20));
    assert!(cc.pixels().all(|p| p.0 == [0, 255, 0]));

    // Already at size: unchanged for both policies.
    let sq_img = bands(32, 32);
    assert_eq!(prepare(&sq_img, 32, ResizePolicy::Squash), sq_img);
    assert_eq!(prepare(&sq_img, 32, ResizePolicy::CenterCrop), sq_img);
}

#[test]
fn resize_policy_parsing() {
    assert_eq!(
        "squash".parse::<ResizePolicy>().unwrap(),
        ResizePolicy::Squash
    );
    assert_eq!(
        "center-crop".parse::<ResizePolicy>().unwrap(),
        ResizePolicy::CenterCrop
    );
    assert_eq!(
        "Center_Crop".parse::<ResizePolicy>().unwrap(),
        ResizePolicy::CenterCrop
    );
    let e = "stretch".parse::<ResizePolicy>().unwrap_err();
    assert!(e.contains("stretch") && e.contains("center-crop"), "{e}");
    assert_eq!(
        serde_json::to_string(&ResizePolicy::CenterCrop).unwrap(),
        "\"center-crop\""
    );
    assert_eq!(
        serde_json::from_str::<ResizePolicy>("\"squash\"").unwrap(),
        ResizePolicy::Squash
    );
    assert_eq!(ResizePolicy::CenterCrop.to_string(), "center-crop");
}

#[test]
fn load_for_model_pixels_and_hash() {
    let t = TempDir::new("model");
    let p = t.join("x.png");
    bands(64, 32).save(&p).unwrap();
    let (pixels, hash) = load_for_model(&p, 16, ResizePolicy::CenterCrop).unwrap();
    assert_eq!(pixels.len(), 16 * 16 * 3);
    assert_eq!(hash, sha256_file(&p).unwrap());
    assert_eq!(hash, sha256_bytes(&std::fs::read(&p).unwrap()));
    let want = prepare(&load_rgb8(&p).unwrap(), 16, ResizePolicy::CenterCrop).into_raw();
    assert_eq!(pixels, want);
}

// ---------------------------------------------------------------- hashes and writes

#[test]
fn sha256_known_value() {
    assert_eq!(
        sha256_bytes(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let t = TempDir::new("sha");
    let p = t.join("abc.txt");
    write(&p, b"abc");
    assert_eq!(sha256_file(&p).unwrap(), sha256_bytes(b"abc"));
    assert!(err_text(sha256_file(t.join("missing.bin"))).contains("missing.bin"));
}

fn no_temp_files(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp-"))
}

#[test]
fn png_encoding_is_deterministic_and_lossless() {
    let img = RgbImage::from_fn(37, 23, |x, y| {
        Rgb([(x * 7) as u8, (y * 11) as u8, (x * y) as u8])
    });
    let a = encode_png(img.as_raw(), 37, 23).unwrap();
    let b = encode_png(img.as_raw(), 37, 23).unwrap();
    assert_eq!(a, b);
    let back = image::load_from_memory(&a).unwrap().to_rgb8();
    assert_eq!(back, img);
    let e = err_text(encode_png(&[0u8; 10], 2, 2));
    assert!(e.contains("10 bytes") && e.contains("2x2"), "{e}");

    let t = TempDir::new("png");
    let p = t.join("out/class a/sample.png");
    let hash = save_png_atomic(&p, img.as_raw(), 37, 23).unwrap();
    assert_eq!(hash, sha256_file(&p).unwrap());
    assert_eq!(std::fs::read(&p).unwrap(), a);
    assert!(no_temp_files(p.parent().unwrap()));
}

#[test]
fn atomic_write_replaces_and_cleans_up() {
    let t = TempDir::new("atomic");
    let p = t.join("deep/er/file.json");
    write_atomic(&p, b"first").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"first");
    write_atomic(&p, b"second, longer").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
    assert!(no_temp_files(p.parent().unwrap()));
    assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);

    write_json_atomic(&p, &serde_json::json!({"a": 1, "b": [1, 2]})).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    assert_eq!(v["b"][1], 2);
    assert!(std::fs::read(&p).unwrap().ends_with(b"\n"));

    // The target is a folder: the rename fails, the error names it, and no temporary remains.
    let dir_target = t.join("deep/er/adir");
    std::fs::create_dir_all(dir_target.join("x")).unwrap();
    let e = err_text(write_atomic(&dir_target, b"x"));
    assert!(e.contains("adir"), "{e}");
    assert!(no_temp_files(p.parent().unwrap()));

    // Many threads writing the same target: every result is one complete version.
    let p2 = t.join("race.bin");
    std::thread::scope(|s| {
        for i in 0..8u8 {
            let p2 = &p2;
            s.spawn(move || write_atomic(p2, &[i; 4096]).unwrap());
        }
    });
    let got = std::fs::read(&p2).unwrap();
    assert_eq!(got.len(), 4096);
    assert!(got.iter().all(|&b| b == got[0]));
    assert!(no_temp_files(t.path()));
}

#[test]
fn temporaries_of_dead_writers_are_removed_and_others_kept() {
    let t = common::empty_temp_dir("stale-temps");
    let live = format!(".a.png.tmp-{}-0", std::process::id());
    // No process has this id (Linux pids stay below 2^22).
    let dead = ".b.json.tmp-4000000000-3";
    for name in [live.as_str(), dead, "c.png", ".hidden", "d.tmp-1-2"] {
        std::fs::write(t.join(name), b"x").unwrap();
    }
    let removed = remove_stale_temps(&t).unwrap();
    let left: std::collections::BTreeSet<String> =
        std::fs::read_dir(&t).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    if std::path::Path::new("/proc/self").exists() {
        assert_eq!(removed, 1);
        assert!(!left.contains(dead), "{left:?}");
    } else {
        eprintln!("no /proc: liveness cannot be checked, nothing is removed");
        assert_eq!(removed, 0);
    }
    for kept in [live.as_str(), "c.png", ".hidden", "d.tmp-1-2"] {
        assert!(left.contains(kept), "{kept} must be kept: {left:?}");
    }
    assert_eq!(remove_stale_temps(&t.join("missing")).unwrap(), 0);
}

#[test]
fn a_corrupted_cache_entry_or_checkpoint_is_never_trusted() {
    use candle_core::{Device, Tensor};
    use diffii::synth::cache::{load, store, InversionKey, Lookup};
    let dir = common::empty_temp_dir("corrupt-cache");
    let key = InversionKey {
        image_sha256: "a".into(),
        model_sha256: "b".into(),
        concepts_sha256: "c".into(),
        lora_sha256: String::new(),
        prompt: "p".into(),
        steps: 2,
        size: 8,
        resize: "squash".into(),
        dtype: "f32".into(),
    };
    let latent = Tensor::arange(0f32, 16.0, &Device::Cpu).unwrap().reshape((1, 4, 2, 2)).unwrap();
    let path = dir.join("x.inv.safetensors");
    store(&path, &key, &latent).unwrap();
    assert!(matches!(load(&path, &key, &Device::Cpu).unwrap(), Lookup::Hit(_)));
    // Flip one bit of the last value: the header still parses, the data no longer matches.
    let flip = |p: &std::path::Path| {
        let mut b = std::fs::read(p).unwrap();
        let n = b.len();
        b[n - 2] ^= 0x10;
        std::fs::write(p, b).unwrap();
    };
    flip(&path);
    match load(&path, &key, &Device::Cpu).unwrap() {
        Lookup::Stale(why) => assert!(why.contains("corrupted"), "{why}"),
        _ => panic!("a corrupted entry was not reported stale"),
    }
    // A checkpoint likewise: refused with its name, never resumed from.
    let ck = dir.join("checkpoint.safetensors");
    diffii::train::checkpoint::write(&ck, "sha", &[("step", 3)], vec![("rows".into(), latent.clone())], &[]).unwrap();
    let c = diffii::train::checkpoint::Checkpoint::read(&ck, &Device::Cpu, "sha").unwrap();
    assert_eq!(c.position("step").unwrap(), 3);
    flip(&ck);
    let e = diffii::train::checkpoint::Checkpoint::read(&ck, &Device::Cpu, "sha").err().expect("a corrupted checkpoint is refused").to_string();
    assert!(e.contains("checkpoint.safetensors") && e.contains("corrupted"), "{e}");
}
