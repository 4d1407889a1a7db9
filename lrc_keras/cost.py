"""The cost model: multiply-adds of a gated layer against its dense twin.

A `d → n` dense layer costs `d·n` multiply-adds a row; the gated layer costs the estimate
`r·(d + n)` plus the computed units `ρ·d·n`, ρ the predicted density. These counts are the
upper bound on any measured speed-up (`benchmarks/benchmark.py` prints both side by side), and what
`calibrate` minimises.
"""


def gated_multiply_adds(input_dim, units, rank, density):
    """Multiply-adds a row of the gated layer: r·(d + n) + ρ·d·n."""
    return rank * (input_dim + units) + density * input_dim * units


def cost_model_speedup(input_dim, units, rank, density):
    """Dense multiply-adds over gated ones for one row: d·n / (r·(d + n) + ρ·d·n)."""
    return input_dim * units / gated_multiply_adds(input_dim, units, rank, density)


def network_cost_model_speedup(dense_shapes, gated_layers):
    """Whole-network multiply-adds, dense twin over gated.

    `dense_shapes`: (input_dim, units) of the layers that stay dense (counted in both);
    `gated_layers`: (input_dim, units, rank, density) of the gated ones.
    """
    dense = sum(d * n for d, n in dense_shapes)
    gated = dense + sum(gated_multiply_adds(d, n, r, rho) for d, n, r, rho in gated_layers)
    dense += sum(d * n for d, n, _, _ in gated_layers)
    return dense / gated
