//! candle's backward pass with our patch (vendor/candle.py): a tensor's first gradient
//! contribution is stored as it is instead of added to fresh zeros. These check that the
//! gradients are still exactly what the chain rule gives: a sum over every use, negated
//! through a subtraction, summed over broadcast dimensions, contiguous where the
//! contribution was a strided view, and bitwise equal to the arithmetic done by hand.

use candle_core::{Device, Tensor, Var};

fn var(v: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn a_tensor_used_twice_gets_the_sum_of_both_contributions() {
    let x = var(&[1.0, -2.0, 3.5, 0.25], &[4]);
    let (a, b) =
        (Tensor::new(&[0.3f32, 1.7, -0.9, 2.2], &Device::Cpu).unwrap(), Tensor::new(&[1.1f32, 0.1, 0.7, -3.0], &Device::Cpu).unwrap());
    // y = Σ (x·a + x·b): dy/dx = a + b, in that order of accumulation.
    let y = (x.as_tensor() * &a).unwrap().add(&(x.as_tensor() * &b).unwrap()).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap();
    let got = values(g.get(x.as_tensor()).expect("x has a gradient"));
    let (av, bv) = (values(&a), values(&b));
    for i in 0..4 {
        let want = av[i] + bv[i];
        let other = bv[i] + av[i];
        assert!(got[i].to_bits() == want.to_bits() || got[i].to_bits() == other.to_bits(), "{i}: {} vs {want}", got[i]);
    }
}

#[test]
fn a_subtracted_tensor_gets_the_negated_gradient_and_a_single_use_the_gradient_itself() {
    let x = var(&[1.0, 2.0, 3.0], &[3]);
    let c = var(&[5.0, 5.0, 5.0], &[3]);
    let w = Tensor::new(&[0.5f32, -4.0, 7.25], &Device::Cpu).unwrap();
    // y = Σ (c − x)·w: dy/dx = −w, dy/dc = w exactly.
    let y = ((c.as_tensor() - x.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap();
    assert_eq!(values(g.get(x.as_tensor()).unwrap()), vec![-0.5, 4.0, -7.25]);
    assert_eq!(values(g.get(c.as_tensor()).unwrap()), vec![0.5, -4.0, 7.25]);
}

#[test]
fn broadcast_and_transposed_uses_give_summed_contiguous_gradients() {
    // x [2, 3] used through a transpose (a strided view of the gradient) and a
    // broadcast bias [3] added to every row.
    let x = var(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let bias = var(&[0.1, 0.2, 0.3], &[3]);
    let w = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap(); // [3, 2]
    let xt = x.as_tensor().t().unwrap(); // [3, 2]
    let y = (xt * &w).unwrap().sum_all().unwrap();
    let z = x.as_tensor().broadcast_add(bias.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap();
    let g = (y + z).unwrap().backward().unwrap();
    let gx = g.get(x.as_tensor()).unwrap();
    assert!(gx.is_contiguous(), "a variable's gradient is contiguous");
    // dy/dx = wᵀ; dz/dx = 2(x + bias).
    let (xv, bv) = ([1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [0.1f32, 0.2, 0.3]);
    let wt = [1.0f32, 3.0, 5.0, 2.0, 4.0, 6.0];
    let got = values(gx);
    for i in 0..6 {
        let dz = 2.0 * (xv[i] + bv[i % 3]);
        assert!((got[i] - (wt[i] + dz)).abs() <= 1e-6, "dx[{i}] = {} vs {}", got[i], wt[i] + dz);
    }
    // d/dbias = Σ over rows of 2(x + bias).
    let gb = values(g.get(bias.as_tensor()).unwrap());
    for j in 0..3 {
        let want = 2.0 * (xv[j] + bv[j]) + 2.0 * (xv[3 + j] + bv[j]);
        assert!((gb[j] - want).abs() <= 1e-5, "dbias[{j}] = {} vs {want}", gb[j]);
    }
}

#[test]
fn a_gradient_that_arrives_as_a_strided_view_is_stored_contiguous() {
    let v = var(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let w = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap(); // [3, 2]
                                                                                          // v's only use is through a transpose, so its one contribution is wᵀ as a view.
    let g = (v.as_tensor().t().unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gv = g.get(v.as_tensor()).unwrap();
    assert!(gv.is_contiguous() && gv.layout().start_offset() == 0);
    assert_eq!(values(gv), vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
}

#[test]
fn an_unused_variable_gets_no_gradient() {
    let x = var(&[1.0, 2.0], &[2]);
    let unused = var(&[3.0], &[1]);
    let g = x.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(values(g.get(x.as_tensor()).unwrap()), vec![2.0, 4.0]);
    assert!(g.get(unused.as_tensor()).is_none());
}

#[test]
fn large_gradients_are_summed_in_parallel_with_the_same_bits_as_a_plain_add() {
    // 90,000 elements: above the patch's threshold for the rayon add (65,536).
    let n = 300;
    let vals = |seed: u32| -> Vec<f32> {
        let mut s = seed;
        (0..n * n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let x = var(&vals(1), &[n, n]);
    let a = Tensor::from_vec(vals(2), (n, n), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(vals(3), (n, n), &Device::Cpu).unwrap();
    let c = Tensor::from_vec(vals(4), (n, n), &Device::Cpu).unwrap();
    // Three uses: dy/dx = a + b + c, accumulated in some order of the three.
    let t = x.as_tensor();
    let y = ((t * &a).unwrap() + (t * &b).unwrap()).unwrap().add(&(t * &c).unwrap()).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap();
    let got = values(g.get(t).unwrap());
    let (av, bv, cv) = (values(&a), values(&b), values(&c));
    for i in 0..n * n {
        let orders = [(av[i] + bv[i]) + cv[i], (av[i] + cv[i]) + bv[i], (bv[i] + cv[i]) + av[i]];
        assert!(orders.iter().any(|o| o.to_bits() == got[i].to_bits()), "element {i}: {} is no order of a + b + c", got[i]);
    }
}
