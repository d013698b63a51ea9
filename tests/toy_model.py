"""`--set` overrides that shrink the `tiny` preset to a toy (2 layers, hidden 64: steps take milliseconds)
while keeping every feature: low-rank q, a dense and an MoE layer, shared + routed experts in 2 groups. It
also pins fp32, so a test's figures do not depend on the host CPU (the preset's `auto` is bf16 where the
CPU has bf16 units); tests of other precisions set theirs after it."""

TOY_MODEL = [
    "model.num_hidden_layers=2",
    "model.first_k_dense_replace=1",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.moe_intermediate_size=32",
    "model.num_attention_heads=2",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "model.n_routed_experts=8",
    "model.num_experts_per_tok=2",
    "model.n_group=2",
    "model.topk_group=1",
    "train.precision=fp32",
]
