//! Where a server without `--blocks` should sit: Petals' rule, cover the weakest blocks first.

use swarm::protocol::ServerInfo;

/// Per-block served throughput (tokens/s summed over the servers hosting each block).
pub fn block_throughputs(num_layers: usize, servers: &[ServerInfo]) -> Vec<f64> {
    let mut t = vec![0.0; num_layers];
    for s in servers {
        for b in (s.start as usize)..(s.end as usize).min(num_layers) {
            t[b] += s.throughput;
        }
    }
    t
}

/// The start of the `len`-block window whose sorted throughputs are lexicographically
/// smallest: the window that holds the least-served block (ties: the next least, ...).
pub fn choose_start(throughputs: &[f64], len: usize) -> usize {
    let len = len.min(throughputs.len()).max(1);
    (0..=throughputs.len() - len)
        .min_by(|&a, &b| {
            let mut wa = throughputs[a..a + len].to_vec();
            let mut wb = throughputs[b..b + len].to_vec();
            wa.sort_by(f64::total_cmp);
            wb.sort_by(f64::total_cmp);
            wa.iter()
                .zip(&wb)
                .map(|(x, y)| x.total_cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_uncovered_blocks() {
        assert_eq!(choose_start(&[5.0, 5.0, 0.0, 0.0], 2), 2);
        assert_eq!(choose_start(&[0.0, 0.0, 0.0, 0.0], 2), 0);
        assert_eq!(choose_start(&[3.0, 1.0, 2.0, 9.0], 2), 1);
    }
}
