"""Type stub for the native extension built from csrc/ (csrc/bindings.cpp is the source).

Pointers are `tensor.data_ptr()` values, `dtype` is a tag from cascade_rt._ext.DTYPE_TAGS and
`stream` a raw cudaStream_t. The *_cuda launchers and the attention/layernorm2d limits exist
only when the extension was built with CUDA (`with_cuda`).
"""

with_cuda: bool
vq_max_dim: int
layernorm2d_max_c: int
attention_cuda_max_head_dim: int

def attention_cuda(
    q: int,
    k: int,
    v: int,
    k2: int,
    v2: int,
    out: int,
    batch: int,
    heads: int,
    head_dim: int,
    nq: int,
    nk: int,
    nc: int,
    q_strides: tuple[int, int, int],
    k_strides: tuple[int, int, int],
    v_strides: tuple[int, int, int],
    k2_strides: tuple[int, int, int],
    v2_strides: tuple[int, int, int],
    out_strides: tuple[int, int, int],
    dtype: int,
    stream: int,
) -> None: ...
def grn_gelu_cpu(
    h: int, gamma: int, beta: int, out: int, scale: int, b: int, hw: int, c: int, dtype: int
) -> None: ...
def grn_gelu_cuda(
    h: int,
    gamma: int,
    beta: int,
    out: int,
    scale: int,
    partial: int,
    b: int,
    hw: int,
    c: int,
    tiles: int,
    dtype: int,
    stream: int,
) -> None: ...
def groupnorm_silu_cpu(
    x: int,
    weight: int,
    bias: int,
    out: int,
    b: int,
    c: int,
    hw: int,
    groups: int,
    channels_last: bool,
    eps: float,
    dtype: int,
) -> None: ...
def groupnorm_silu_cuda(
    x: int,
    weight: int,
    bias: int,
    out: int,
    workspace: int,
    b: int,
    c: int,
    hw: int,
    groups: int,
    tiles: int,
    channels_last: bool,
    eps: float,
    dtype: int,
    stream: int,
) -> None: ...
def layernorm2d_cpu(
    x: int,
    residual: int,
    scale: int,
    shift: int,
    mod_stride: int,
    post_scale: int,
    post_shift: int,
    out: int,
    pre: int,
    rows: int,
    rows_per_sample: int,
    c: int,
    eps: float,
    dtype: int,
) -> None: ...
def layernorm2d_cuda(
    x: int,
    residual: int,
    scale: int,
    shift: int,
    mod_stride: int,
    post_scale: int,
    post_shift: int,
    out: int,
    pre: int,
    rows: int,
    rows_per_sample: int,
    c: int,
    eps: float,
    dtype: int,
    stream: int,
) -> None: ...
def vq_lookup_cpu(
    x: int, codebook: int, indices: int, quantized: int, n: int, k: int, d: int, dtype: int
) -> None: ...
def vq_lookup_cuda(
    x: int,
    codebook: int,
    indices: int,
    quantized: int,
    n: int,
    k: int,
    d: int,
    dtype: int,
    stream: int,
) -> None: ...
