"""Adam8bit and AdamW8bit: Adam / AdamW with 8-bit block-wise states (Dettmers et al., "8-bit
Optimizers via Block-wise Quantization", ICLR 2022), one fused launch per bucket.

Per param of at least `min_8bit_size` elements, each moment is stored as uint8 codes (the
param's shape) and one fp32 absmax per block of `block_size` consecutive elements (flattened
order): exp_avg on the signed dynamic map, exp_avg_sq (and max_exp_avg_sq) on the unsigned
one; adam_triton.reference.adam8bit_step is the math. Smaller params keep fp32 states under
torch's keys and take Adam's kernel, from the same optimizer (their own bucket and launch).

State keys of an 8-bit param (plain tensors, so torch.save, trainer checkpoints and DCP take
them as they are): `step`, `exp_avg_codes` / `exp_avg_absmax`, `exp_avg_sq_codes` /
`exp_avg_sq_absmax`, with amsgrad `max_exp_avg_sq_codes` / `max_exp_avg_sq_absmax`.
"""

import math

import torch

from . import reference, tuning
from ._base import _kernels
from ._state import Slot
from ._tensors import KERNEL_DTYPES, is_dtensor, local, real
from .adam import Adam

# (state name, signed map) of the moments, in kernel slot order; each is stored as
# <name>_codes (uint8) and <name>_absmax (fp32, one per block)
MOMENTS = (("exp_avg", True), ("exp_avg_sq", False), ("max_exp_avg_sq", False))
CODES, ABSMAX = "_codes", "_absmax"
ZERO_CODE = {True: 127, False: 0}  # the code of 0 on the signed / unsigned map
# block sizes the kernel takes: powers of two (a tile row is a block), at most the
# interpreter's chunk (4096 elements per program: a block never straddles programs; on the GPU
# a chunk is whole tiles of at least one block each)
MIN_BLOCK, MAX_BLOCK = 32, 4096
# group options of the 8-bit optimizers, with the values checkpoints without them get
DEFAULTS_8BIT = dict(block_size=256, min_8bit_size=4096)

_maps = {}  # device -> kernels.quant8.map_tables, built once per device


def _check_8bit_options(block_size, min_8bit_size):
    if (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size & (block_size - 1)
            or not MIN_BLOCK <= block_size <= MAX_BLOCK):
        raise ValueError(f"Invalid block_size value: {block_size} (a power of two from {MIN_BLOCK} to {MAX_BLOCK})")
    if not isinstance(min_8bit_size, int) or isinstance(min_8bit_size, bool) or min_8bit_size < 0:
        raise ValueError(f"Invalid min_8bit_size value: {min_8bit_size}")


def _whole_chunk(config):
    """Whether a launch with config takes its chunk as one tile: under the interpreter's
    config (its operations cost the same at any size)."""
    return config == tuning.INTERPRETER_CONFIG


def _device_maps(device):
    maps = _maps.get(device)
    if maps is None:
        from .kernels import quant8

        table = quant8.map_tables(reference.dynamic_map(True), reference.dynamic_map(False))
        maps = _maps[device] = table.to(device)
    return maps


class Adam8bit(Adam):
    """torch.optim.Adam's signature, defaults and errors (without state_dtype) with 8-bit
    block-wise states for params of at least `min_8bit_size` elements (fp32 states, under
    torch's keys, for smaller ones).

    block_size: elements per fp32 absmax (a power of two from 32 to 4096), min_8bit_size:
    the smallest param (in elements) that gets 8-bit states; both are param-group options.
    max_grad_norm, master_weights, stochastic_rounding, seed, tensor lr and GradScaler work
    as in Adam. DTensor (FSDP2) params are refused: see the README."""

    kernel_name = "adam8bit"

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
        foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
        decoupled_weight_decay=False, max_grad_norm=None, master_weights=False, stochastic_rounding=False,
        seed=0, block_size=256, min_8bit_size=4096,
    ):
        _check_8bit_options(block_size, min_8bit_size)
        self._defaults_8bit = dict(block_size=block_size, min_8bit_size=min_8bit_size)  # read by add_param_group
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, max_grad_norm=max_grad_norm,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding, seed=seed,
        )
        self.defaults.update(self._defaults_8bit)

    def add_param_group(self, param_group):
        """torch's add_param_group; the group gets block_size / min_8bit_size (checked), and
        DTensor params are refused before anything changes."""
        for k, v in getattr(self, "_defaults_8bit", DEFAULTS_8BIT).items():
            param_group.setdefault(k, self.defaults.get(k, v))
        _check_8bit_options(param_group["block_size"], param_group["min_8bit_size"])
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # (torch refuses a set)
            params = param_group["params"] = list(params)  # a generator is read once, here
        for p in [params] if isinstance(params, torch.Tensor) else params:
            if is_dtensor(p[1] if isinstance(p, tuple) else p):  # (named params come as (name, param))
                raise TypeError(
                    f"{type(self).__name__} does not take DTensor params (FSDP2): each block's absmax would "
                    "belong to a block of one rank's local shard, so the state would depend on the sharding "
                    "and a sharded checkpoint could not be resharded or even saved correctly (see the "
                    "README); use adam_triton.AdamW with FSDP2"
                )
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        defaults = getattr(self, "defaults", {})
        for group in self.param_groups:
            for k, v in DEFAULTS_8BIT.items():
                group.setdefault(k, defaults.get(k, v))

    # -- the state of a param -----------------------------------------------------------------
    @staticmethod
    def is_8bit(group, param):
        """Whether param gets 8-bit states in group (numel >= the group's min_8bit_size)."""
        return param.numel() >= group["min_8bit_size"]

    def state_keys(self, group):
        """State keys of an 8-bit param, in the kernel's slot order."""
        names = [name for name, _ in MOMENTS[:3 if group["amsgrad"] else 2]]
        return [name + suffix for name in names for suffix in (CODES, ABSMAX)]

    def _slots(self, group, param):
        """8-bit params: codes (uint8, one per real element, starting at the code of 0) and
        absmax (fp32, one per block, starting at 0) of each moment. Smaller params: Adam's
        buffers in fp32 (in the param's dtype for float64 and complex params)."""
        if is_dtensor(param):
            raise TypeError(f"{type(self).__name__} does not take DTensor params (FSDP2)")
        if not self.is_8bit(group, param):
            dtype = param.dtype if param.dtype not in KERNEL_DTYPES else torch.float32
            keys = [name for name, _ in MOMENTS[:3 if group["amsgrad"] else 2]]
            return [Slot(key, dtype) for key in keys] + [None] * (3 - len(keys))
        shape = tuple(real(param).shape) if param.is_complex() else None  # one code per real number
        blocks = (math.ceil(real(param).numel() / group["block_size"]),)
        slots = []
        for name, signed in MOMENTS[:3 if group["amsgrad"] else 2]:
            slots += [Slot(name + CODES, torch.uint8, shape, ZERO_CODE[signed]), Slot(name + ABSMAX, torch.float32, blocks)]
        return slots

    def _flags(self, group):
        return (*super()._flags(group), group["block_size"])

    # -- the two paths ------------------------------------------------------------------------
    def _launch(self, bucket, tables, hyper, grad_scale=None, found_inf=None, clip_coef=None):
        if bucket.slot_keys[0] != "exp_avg" + CODES:
            return super()._launch(bucket, tables, hyper, grad_scale, found_inf, clip_coef)  # fp32 states
        kernels = _kernels()
        amsgrad, maximize, wd_mode, block_size = bucket.flags
        p_dtype, g_dtype, _ = bucket.tl_dtypes
        kernels.adam8bit_update(
            tables.table, tables.n_rows, bucket.chunks, bucket.n_chunks, hyper, _device_maps(bucket.device),
            block_size=block_size, amsgrad=amsgrad, maximize=maximize,
            wd_mode=kernels.WD_L2 if wd_mode == "l2" else kernels.WD_DECOUPLED,
            param_dtype=p_dtype, grad_dtype=g_dtype, aligned=tables.aligned, config=bucket.config,
            grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, master=bucket.master,
            stochastic=bucket.stochastic, seed=self.seed, whole_chunk=_whole_chunk(bucket.config),
        )

    def _chunk_elements(self, bucket, config):
        if bucket.slot_keys[0] != "exp_avg" + CODES:
            return super()._chunk_elements(bucket, config)
        return _kernels().adam8bit.launch_shape(bucket.flags[3], config, _whole_chunk(config))[0]

    def _reference(self, group, tensor_lists, steps, grad_scale, compute_dtype):
        if tensor_lists[2] is None or tensor_lists[2][0].dtype != torch.uint8:
            return super()._reference(group, tensor_lists, steps, grad_scale, compute_dtype)
        params, grads, *states = tensor_lists
        pairs = [list(zip(states[k], states[k + 1])) for k in range(0, len(states), 2)]
        beta1, beta2 = group["betas"]
        reference.adam8bit_step(
            params, grads, pairs[0], pairs[1], pairs[2] if group["amsgrad"] else None, steps,
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"], maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"], grad_scale=grad_scale,
            block_size=group["block_size"],
        )

    # -- checkpoints --------------------------------------------------------------------------
    def load_state_dict(self, state_dict):
        """torch's loader (see Adam; the saved groups' options apply, block_size and
        min_8bit_size included, and groups saved without them get this optimizer's), then
        each param's moments in the layout its group asks for: 8-bit codes as saved (torch's
        loader casts them to the param's dtype), absmax in fp32; fp32 moments of a param that
        gets 8-bit states (a torch.optim.Adam / AdamW checkpoint) quantized with the group's
        block size."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for saved_id, (p, group) in zip(saved_ids, params):
            state, saved = self.state.get(p), state_dict["state"].get(saved_id)
            if state and saved is not None and self.is_8bit(group, p):
                _restore_moments(state, saved, p, group["block_size"])


def _restore_moments(state, saved, param, block_size):
    """The 8-bit moments of param after torch's loader: codes (uint8) and absmax (fp32) as
    saved, or saved fp32 moments (torch's keys) quantized; a missing moment is left to the
    state check of the next step."""
    device = local(param).device
    for name, signed in MOMENTS:
        codes_key, absmax_key = name + CODES, name + ABSMAX
        if isinstance(saved.get(codes_key), torch.Tensor) and isinstance(saved.get(absmax_key), torch.Tensor):
            state[codes_key] = saved[codes_key].to(device=device, dtype=torch.uint8, copy=True)
            state[absmax_key] = saved[absmax_key].to(device=device, dtype=torch.float32, copy=True)
        elif isinstance(saved.get(name), torch.Tensor):
            x = saved[name].to(device)
            x = torch.view_as_real(x) if x.is_complex() else x
            qmap = reference.dynamic_map(signed).to(device)
            state[codes_key], state[absmax_key] = reference.quantize_blockwise(x.float(), qmap, block_size)
            del state[name]


class AdamW8bit(Adam8bit):
    """torch.optim.AdamW with 8-bit block-wise states: Adam8bit with decoupled weight decay,
    default weight_decay=0.01."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
        maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
        max_grad_norm=None, master_weights=False, stochastic_rounding=False, seed=0, block_size=256,
        min_8bit_size=4096,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            max_grad_norm=max_grad_norm, master_weights=master_weights, stochastic_rounding=stochastic_rounding,
            seed=seed, block_size=block_size, min_8bit_size=min_8bit_size,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
