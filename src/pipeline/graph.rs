//! Ordering stage templates: a topological order that follows the file, and the path of a cycle
//! for the error that reports one.

use petgraph::graph::{DiGraph, NodeIndex};

/// A topological order that keeps declaration order wherever the edges allow (Kahn's algorithm,
/// always taking the earliest-declared ready stage), so listings follow the file.
pub(super) fn declaration_order_topo(graph: &DiGraph<String, ()>) -> Vec<String> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut indegree: Vec<usize> = graph
        .node_indices()
        .map(|n| {
            graph
                .neighbors_directed(n, petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = graph
        .node_indices()
        .filter(|n| indegree[n.index()] == 0)
        .map(|n| Reverse(n.index()))
        .collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(Reverse(i)) = ready.pop() {
        let node = NodeIndex::new(i);
        order.push(graph[node].clone());
        for next in graph.neighbors(node) {
            indegree[next.index()] -= 1;
            if indegree[next.index()] == 0 {
                ready.push(Reverse(next.index()));
            }
        }
    }
    order
}

/// A cycle through `start`, as a path that ends where it began.
pub(super) fn cycle_path(graph: &DiGraph<String, ()>, start: NodeIndex) -> Vec<NodeIndex> {
    let scc = petgraph::algo::tarjan_scc(graph)
        .into_iter()
        .find(|c| c.contains(&start))
        .unwrap_or_else(|| vec![start]);
    // Walk inside the strongly connected component until a node repeats.
    let mut path = vec![start];
    let mut current = start;
    loop {
        let next = graph
            .neighbors(current)
            .find(|n| scc.contains(n))
            .unwrap_or(start);
        if let Some(pos) = path.iter().position(|&n| n == next) {
            let mut cycle = path[pos..].to_vec();
            cycle.push(next);
            return cycle;
        }
        path.push(next);
        current = next;
    }
}
