//! How a strided tensor maps onto a BLAS product's arguments (transpose flag, leading
//! dimension, one batch stride): pure index arithmetic, kept apart from the CUDA code so its
//! tests run on every machine.

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// How cuBLAS reads one operand: `column_major` when its rows are strided by 1, and the
/// distance between its rows (row-major) or columns (column-major).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Layout {
    pub column_major: bool,
    pub ld: usize,
}

/// The layout of a `rows x cols` matrix with strides `(row, col)`, if cuBLAS can read it
/// (one of the two strides 1, the other spanning the matrix). A dimension of size 1 may carry
/// any stride.
pub(super) fn layout(rows: usize, cols: usize, row: usize, col: usize) -> Option<Layout> {
    if (cols == 1 || col == 1) && (rows == 1 || row >= cols) {
        let ld = if rows == 1 { cols } else { row };
        return Some(Layout {
            column_major: false,
            ld: ld.max(1),
        });
    }
    if (rows == 1 || row == 1) && (cols == 1 || col >= rows) {
        let ld = if cols == 1 { rows } else { col };
        return Some(Layout {
            column_major: true,
            ld: ld.max(1),
        });
    }
    None
}

/// One stride for the flattened batch dimensions of an operand (0 where it is broadcast), if
/// its batch dimensions are evenly spaced.
pub(super) fn batch_stride(shape: &[usize], strides: &[usize], out: &[usize]) -> Option<usize> {
    let mut flat: Option<usize> = None;
    let mut inner = 1usize;
    for i in (0..out.len()).rev() {
        if out[i] == 1 {
            continue;
        }
        let effective = if shape[i] == 1 { 0 } else { strides[i] };
        match flat {
            None => flat = Some(effective),
            Some(f) if effective == f.checked_mul(inner)? => {}
            Some(_) => return None,
        }
        inner = inner.checked_mul(out[i])?;
    }
    Some(flat.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        // A contiguous [4, 3]; its transpose view [3, 4] with strides (1, 3).
        assert_eq!(
            layout(4, 3, 3, 1),
            Some(Layout {
                column_major: false,
                ld: 3
            })
        );
        assert_eq!(
            layout(3, 4, 1, 3),
            Some(Layout {
                column_major: true,
                ld: 3
            })
        );
        // Rows of 16 inside a buffer of 128-wide rows (a KV cache view).
        assert_eq!(
            layout(5, 16, 128, 1),
            Some(Layout {
                column_major: false,
                ld: 128
            })
        );
        // One row or one column: any stride.
        assert_eq!(
            layout(1, 8, 999, 1),
            Some(Layout {
                column_major: false,
                ld: 8
            })
        );
        assert_eq!(
            layout(8, 1, 1, 999),
            Some(Layout {
                column_major: false,
                ld: 1
            })
        );
        // Overlapping or scattered: refused.
        assert_eq!(layout(4, 3, 2, 1), None);
        assert_eq!(layout(4, 3, 6, 2), None);
    }

    #[test]
    fn batch_strides() {
        // [2, 3] batches, contiguous matrices of 20 elements.
        assert_eq!(batch_stride(&[2, 3], &[60, 20], &[2, 3]), Some(20));
        // Broadcast over every batch.
        assert_eq!(batch_stride(&[1, 1], &[20, 20], &[2, 3]), Some(0));
        // KV heads `capacity` rows apart: one stride.
        assert_eq!(
            batch_stride(&[1, 8], &[8 * 4096 * 128, 4096 * 128], &[1, 8]),
            Some(4096 * 128)
        );
        // Broadcast in one dimension only: not one stride.
        assert_eq!(batch_stride(&[2, 1], &[20, 20], &[2, 3]), None);
        // Unevenly spaced.
        assert_eq!(batch_stride(&[2, 3], &[100, 20], &[2, 3]), None);
    }
}
