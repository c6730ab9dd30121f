use burn::prelude::*;
use burn::tensor::Distribution;
use std::time::Instant;

fn main() {
    metamix::device::on_compute_threads(|| {
        let dev = Device::flex();
        for (m, k, n, ta, tb) in [
            (2048, 384, 1152, false, false),
            (2048, 384, 1536, false, false),
            (2048, 1536, 384, false, false),
            (2048, 1152, 384, false, true), // dX = dY W^T
            (384, 2048, 1152, true, false), // dW = X^T dY
            (768, 128, 384, false, false),
            (768, 384, 128, false, true),
            (128, 768, 384, true, false),
        ] {
            let a = if ta {
                Tensor::<2>::random([k, m], Distribution::Default, &dev).transpose()
            } else {
                Tensor::<2>::random([m, k], Distribution::Default, &dev)
            };
            let b = if tb {
                Tensor::<2>::random([n, k], Distribution::Default, &dev).transpose()
            } else {
                Tensor::<2>::random([k, n], Distribution::Default, &dev)
            };
            for _ in 0..3 {
                let _ = a.clone().matmul(b.clone()).into_data();
            }
            let reps = 20;
            let t = Instant::now();
            for _ in 0..reps {
                let _ = a.clone().matmul(b.clone()).into_data();
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{m}x{k}x{n} ta={ta} tb={tb}: {:.3} ms, {:.1} GFLOP/s",
                s * 1e3,
                2.0 * (m * k * n) as f64 / s / 1e9
            );
        }
    });
}
