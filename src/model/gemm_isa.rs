//! `gemm`'s f32 GEMM on a chosen kernel path (`isa::Isa`).
//!
//! Why: `gemm::gemm` picks its microkernels from the CPU once and offers no switch, so on
//! an AVX-512 machine its AVX2 (FMA) and scalar paths would never run, and could never be
//! tested or benchmarked. `gemm` builds each path by instantiating its public generic
//! driver (`gemm_common::gemm::gemm_basic_generic`) with the microkernel tables that
//! `gemm_f32::microkernel` exports; this file does the same for the path we ask for.
//! `Isa::Avx512` calls `gemm::gemm` itself (what it picks on such a CPU).

use gemm::Parallelism;
use gemm_common::simd::MixedSimd;

use super::isa::Isa;

/// dst[m×n] := alpha·dst + beta·lhs[m×k]·rhs[k×n] (dst read only when `read_dst`), every
/// matrix given by a pointer and (column stride, row stride) in elements, as `gemm::gemm`.
///
/// # Safety
/// `isa` is supported by this CPU; the pointers are valid for the extents their strides
/// describe; `dst` does not alias `lhs` or `rhs`; strides are non-negative.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f32,
    beta: f32,
    par: Parallelism,
) {
    debug_assert!(isa.supported() && dst_cs >= 0 && dst_rs >= 0 && lhs_cs >= 0 && lhs_rs >= 0 && rhs_cs >= 0 && rhs_rs >= 0);
    if isa == Isa::Avx512 {
        gemm::gemm(m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, alpha, beta, false, false, false, par);
        return;
    }
    // As `gemm::gemm` does: its microkernels want a column-oriented destination, so a
    // row-oriented product is computed as its transpose (dstᵀ = rhsᵀ·lhsᵀ).
    let (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) = if dst_cs.abs() < dst_rs.abs() {
        (n, m, dst_rs, dst_cs, rhs, rhs_rs, rhs_cs, lhs, lhs_rs, lhs_cs)
    } else {
        (m, n, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs)
    };
    // `gemm`'s generic driver with one path's SIMD type, microkernel tables and f32 lanes
    // per vector, as `gemm_f32` instantiates it (same multiply-add outside the kernels).
    macro_rules! driver {
        ($simd:ty, $kernels:path, $lanes:expr) => {{
            use $kernels as u;
            const N: usize = $lanes;
            let simd = <$simd as MixedSimd<f32, f32, f32, f32>>::try_new().expect("path checked by isa::supported");
            #[rustfmt::skip]
            gemm_common::gemm::gemm_basic_generic::<_, f32, N, { u::MR_DIV_N * N }, { u::NR }, { u::MR_DIV_N }, { u::H_M }, { u::H_N }>(
                simd, m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, alpha, beta,
                false, false, false, |a: f32, b: f32, c: f32| a * b + c, &u::UKR, &u::H_UKR, false, par,
            );
        }};
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => driver!(gemm_common::simd::V3, gemm_f32::microkernel::fma::f32, 8),
        _ => driver!(gemm_common::simd::Scalar, gemm_f32::microkernel::scalar::f32, 1),
    }
}
