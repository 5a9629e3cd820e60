mod common;
use common::*;
#[test]
fn scratch() {
    let r = ref_tensors();
    let ac = r["alphas_cumprod"].to_vec1::<f32>().unwrap();
    let at = ac[981];
    let c = (1.0f32 - at).sqrt();
    let target = f32::from_bits(c.to_bits() + 1);
    eprintln!("ours {c:e} target {target:e}");
    eprintln!("f64 1-a then sqrt {:e}", (1.0 - at as f64).sqrt() as f32);
    eprintln!("powf {:e}", (1.0f32 - at).powf(0.5));
    eprintln!("f64 powf {:e}", ((1.0f32 - at) as f64).powf(0.5) as f32);
    eprintln!("exp(0.5 ln) {:e}", ((1.0f32 - at).ln() * 0.5).exp());
    eprintln!("exp(0.5 ln) f64 {:e}", (((1.0f32 - at) as f64).ln() * 0.5).exp() as f32);
    let b = 1.0f32 - at;
    eprintln!("b {b:e} exact {:e}", 1.0 - at as f64);
    // check each 0..1000 how many differ between sqrt and powf32
    let mut n = 0; for &a in &ac { let b = 1.0f32 - a; if b.sqrt() != b.powf(0.5) { n += 1; } }
    eprintln!("sqrt vs powf(0.5) differ at {n} of 1000");
    let ap = ac[961];
    eprintln!("ap: sqrt(ap) {:e} powf {:e}; sqrt(1-ap) {:e} powf {:e}; sqrt(at) {:e} powf {:e}", ap.sqrt(), ap.powf(0.5), (1.0f32-ap).sqrt(), (1.0f32-ap).powf(0.5), at.sqrt(), at.powf(0.5));
}
