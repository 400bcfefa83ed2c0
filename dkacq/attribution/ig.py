"""Integrated-gradients attribution of a text's representation to feed-forward neurons.

The published algorithm, for one text and one target module with weight ``W`` ``[out, in]`` and bias
``b``: scale ``W`` and ``b`` together by ``alpha`` (everything else fixed), let ``F`` be the L2 norm of
the text's pooled final representation (before any normalisation; or another function of it, the
retrieval score among them: :mod:`dkacq.attribution.objectives`), and take

    A = W * sum_k w_k dF/dW'  at W' = alpha_k W          (elementwise product)
    s_i = sum_j |A_ij|                                    (score of neuron i, a row of W)

with the alphas and weights of :func:`alphas_and_weights`. Done literally, that is one batch-1
forward and backward per (text, module, alpha): 480 per text for a 12-layer BERT.

**Batching identity (exact).** ``X W'^T + b' = alpha (X W^T + b)``: scaling the parameters scales the
module's output ``Y`` by ``alpha``, and nothing below the module changes. So one forward over ``m``
replicas of a text, with a hook multiplying replica ``k``'s module output by ``alpha_k``, computes the
``m`` points of the path side by side (replicas never interact: attention, norms and pooling act
within one row of the batch). With ``X`` the module's input (the same for every replica) and
``g_k = dF_k/dY'_k`` the gradient at replica ``k``'s scaled output, the chain rule through
``Y' = X W'^T + b'`` gives ``dF/dW' = g_k^T X`` and ``dF/db' = sum_tokens g_k``; hence

    sum_k w_k dF/dW' = (sum_k w_k g_k)^T X,

one contraction over tokens per (text, module) instead of one weight gradient per alpha. The
gradients are taken with :func:`torch.autograd.grad` with respect to the module outputs, so no
parameter needs ``requires_grad``. The contraction sums over every position, padding included, as
the published batch-1 gradient does: with CLS (right padding), mean or EOS pooling a padded position
has ``g = 0`` exactly (no real token attends to it and pooling ignores it), so padding contributes
nothing and a text's scores do not depend on its batch. ``eos_reference`` pools at a padded position
by design, and the published mean (``TextEncoder.unmasked_mean``) averages padded positions; there the
padding's contribution is part of the published numbers and is kept.

**Reuse below the module.** One plain forward pass of the texts records the arguments every layer
receives (its input hidden state, attention mask, rotary tables). A target in layer ``l`` is then
attributed by running layer ``l`` once on the texts, from its recorded input, with a hook on the
target that turns the module's output ``Y`` ``[texts, tokens, out]`` into the replicas
``alpha_k Y`` ``[steps, texts, tokens, out]``: what follows the module inside a feed-forward block
(activation, gating product, next projection, residual sum, layer norm) broadcasts over that leading
dimension, so nothing below the module is computed more than once per text. The block's output is
flattened to ``steps x texts`` rows (row ``k * texts + t`` is text ``t`` at ``alpha_k``) for layers
``l+1..L-1``, which run the model's own modules with the recorded arguments selected row by row.
Of the ways to share work across replicas that were measured (docs/design.md), starting them from the
target's output, as here, was the fastest.

**Precision.** Replicas run in the model's dtype; the weighted sum of gradients, the contraction and
the scores are accumulated in float32 (float64 when the model runs in float64), so a bf16 model is
attributed with fp32 sums.

**Memory.** A pass keeps the autograd activations of its replica rows (texts x steps, at most
``replicas_per_pass``), each ``tokens`` long, for every layer from the target's to the top: per row,
token and layer roughly ``10 hidden + 3 intermediate + heads x tokens`` values. Besides that, one
``texts x tokens x (out + in)`` accumulator and one ``texts x out x in`` attribution for the target
in progress.

**Compiled passes** (``compile=``, opt-in). Every layer call of a pass goes through one
``torch.compile``d function of (layer, hidden state, recorded arguments); layers share its graphs
(modules are graph inputs, not constants), and sizes are dynamic, so a handful of graphs (the target's
layer for each target kind, the layers above) serve every layer, text length and replica count. A
hook added to the target for one pass, as the eager path does, would be wrong here: dynamo by default
does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a layer
compiled without the hook would go on running without it, silently. Instead a hook is registered on
every module of every target kind once, before anything is compiled, and stays for the whole call;
it reads its state from attributes that a pass sets, ``alphas`` (``None``: pass the output through)
and a zero ``probe`` ``[steps, texts, tokens, out]`` that requires grad, and returns
``alpha_k Y + probe_k``. Dynamo traces the hook into the graph and guards on that state, so the
scaling is part of the compiled function; ``dF/d probe`` is the gradient at the scaled output (an
input of the graph, so the compiled backward delivers it; an intermediate of a compiled graph would
get none). The compiled calls also guard on every hook dict (``skip_nnmodule_hook_guards=False``), so
a hook anyone adds or removes recompiles rather than being ignored. Parameters that require grad are
switched off for the call (a compiled backward computes every input's gradient, needed or not) and
restored, and the hooks are removed when the call ends. Should dynamo give up on a layer (a graph
break, the recompile limit), that part runs eagerly with the same hooks: slower, still right. The
numbers equal the eager path's up to the compiler's rounding: with inductor, Llama's RMSNorm (float32
inside, whatever the model's dtype) rounds a little differently once fused, about 1e-7 of a module's
largest score in a float64 model and 2e-5 in a float32 one (float32's own error against float64 is
larger).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dkacq.attribution.objectives import ObjectiveFunction, pooled_norm
from dkacq.attribution.targets import ArchitectureFamily, Target, architecture_family
from dkacq.encoders.text_encoder import TextEncoder

PathRule = Literal["reference", "riemann_right"]
PATH_RULES: tuple[str, ...] = ("reference", "riemann_right")


def alphas_and_weights(rule: PathRule, steps: int) -> tuple[Tensor, Tensor]:
    """The path's scaling factors and their weights, float64 ``[steps]`` each.

    ``reference``: ``linspace(1e-6, 1, steps)``, each weighted ``1/steps``, as published (its sum
    over-weights the path's end: the alphas do not sit at the right ends of equal intervals).
    ``riemann_right``: the right Riemann sum ``k/steps`` for ``k = 1..steps``, each weighted
    ``1/steps``, which is what Captum's ``IntegratedGradients(method="riemann_right")`` uses.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if rule == "reference":
        alphas = torch.linspace(1e-6, 1.0, steps, dtype=torch.float64)
    elif rule == "riemann_right":
        alphas = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    else:
        raise ValueError(f"unknown path rule '{rule}'; choose one of {', '.join(PATH_RULES)}")
    return alphas, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


@dataclass(frozen=True)
class PathAttribution:
    """Signed integrated-gradients attributions of one module's parameters, per text."""

    weight: Tensor
    """``[num_texts, out, in]``: ``W * sum_k w_k dF/dW'``."""
    bias: Tensor | None
    """``[num_texts, out]``: ``b * sum_k w_k dF/db'``; ``None`` for a module without bias. Not part of the
    neuron score (the study scores the weight), but needed to check completeness."""

    def neuron_scores(self) -> Tensor:
        """``[num_texts, out]``: ``s_i = sum_j |A_ij|``."""
        return self.weight.abs().sum(dim=-1)


def accumulation_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and half-precision models, float64 for float64 ones."""
    return torch.promote_types(model_dtype, torch.float32)


def neuron_scores(
    encoder: TextEncoder,
    batch: dict[str, Tensor],
    targets: list[Target],
    rule: PathRule = "reference",
    steps: int = 20,
    replicas_per_pass: int | None = None,
    compile: bool | str = False,
    objective: ObjectiveFunction = pooled_norm,
) -> dict[str, Tensor]:
    """Target name -> neuron scores ``[num_texts, num_neurons]`` of a batch of texts, for all targets.

    ``batch`` is a tokenized batch (``input_ids``, ``attention_mask``, either padding side); scores
    are float32 (float64 for a float64 model). See :func:`path_attributions` for the arguments.
    """
    return {
        target.name: attribution.neuron_scores()
        for target, attribution in path_attributions(
            encoder, batch, targets, rule, steps, replicas_per_pass, compile=compile, objective=objective
        )
    }


def path_attributions(
    encoder: TextEncoder,
    batch: dict[str, Tensor],
    targets: list[Target],
    rule: PathRule = "reference",
    steps: int = 20,
    replicas_per_pass: int | None = None,
    compile: bool | str = False,
    objective: ObjectiveFunction = pooled_norm,
) -> Iterator[tuple[Target, PathAttribution]]:
    """Signed attributions of every target's weight and bias, one target at a time, in ``targets`` order.

    ``targets`` come from :func:`dkacq.attribution.targets.find_targets` on ``encoder.transformer``.
    ``replicas_per_pass`` is the number of (text, alpha) replicas in one forward and backward pass:
    by default one text's ``steps``; a multiple of ``steps`` batches that many texts of similar length
    per pass (for GPUs), a smaller number splits a text's steps over several passes (less memory).
    Any split gives the same sums. The transformer must be in eval mode, outside
    ``torch.inference_mode``.

    ``compile`` runs every layer of a pass through :func:`torch.compile` (``True``: the inductor
    backend; a string: that backend, e.g. ``"aot_eager"``): the same numbers up to the compiler's
    rounding, faster on GPUs once compiled (see "Compiled passes" in the module docstring). The first
    passes of each layer shape and dtype pay the compilation.

    ``objective`` is F, from each replica row's pooled vector and its text's row in ``batch``
    (:mod:`dkacq.attribution.objectives`); by default the norm of the pooled vector, as the study.
    """
    alphas, weights = alphas_and_weights(rule, steps)
    if replicas_per_pass is not None and replicas_per_pass < 1:
        raise ValueError(f"replicas_per_pass must be at least 1, got {replicas_per_pass}")
    replicas_per_pass = replicas_per_pass or steps
    transformer = encoder.transformer
    _check_ready(transformer, targets)
    family = architecture_family(transformer)
    blocks = family.layer_stack(transformer)
    final = family.final_module(transformer)
    groups = _text_groups(encoder, blocks, batch, texts_per_pass=max(1, replicas_per_pass // steps))
    step_chunks = torch.arange(steps).split(min(steps, replicas_per_pass))
    accumulate = accumulation_dtype(next(transformer.parameters()).dtype)
    device = batch["input_ids"].device
    weights = weights.to(device, accumulate)
    num_texts = batch["input_ids"].shape[0]
    replica_pass = _replica_pass
    compiled = None
    if compile:
        compiled = _CompiledPasses(family, blocks, "inductor" if compile is True else compile)
        replica_pass = compiled.replica_pass
    try:
        yield from _target_attributions(
            encoder, blocks, final, groups, targets, alphas, weights, step_chunks, num_texts, replica_pass, objective
        )
    finally:
        if compiled is not None:
            compiled.close()


def _target_attributions(
    encoder, blocks, final, groups, targets, alphas, weights, step_chunks, num_texts, replica_pass, objective
) -> Iterator[tuple[Target, PathAttribution]]:
    """The attributions of :func:`path_attributions`, one target at a time, with ``replica_pass``'s gradients."""
    accumulate, device = weights.dtype, weights.device
    for target in targets:
        module = target.module
        weight_gradient = torch.zeros(
            num_texts, module.out_features, module.in_features, dtype=accumulate, device=device
        )
        bias_gradient = torch.zeros(num_texts, module.out_features, dtype=accumulate, device=device)
        for group in groups:
            gradient_sum = 0
            for step_indices in step_chunks:
                gradients, module_input = replica_pass(
                    encoder, blocks, final, group, target, alphas[step_indices], objective
                )
                gradient_sum = gradient_sum + torch.tensordot(weights[step_indices], gradients.to(accumulate), dims=1)
            weight_gradient[group.texts] = gradient_sum.transpose(1, 2) @ module_input.to(accumulate)
            bias_gradient[group.texts] = gradient_sum.sum(dim=1)
        yield (
            target,
            PathAttribution(
                weight=module.weight.to(accumulate) * weight_gradient,
                bias=None if module.bias is None else module.bias.to(accumulate) * bias_gradient,
            ),
        )


def _check_ready(transformer: nn.Module, targets: list[Target]) -> None:
    if transformer.training:
        raise ValueError("attribution needs the transformer in eval mode (dropout would make every replica differ)")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "attribution needs gradients: call it outside torch.inference_mode (Trainer(inference_mode=False))"
        )
    for target in targets:
        if transformer.get_submodule(target.name) is not target.module:
            raise ValueError(f"target '{target.name}' is not a module of this transformer")


@dataclass(frozen=True)
class _BlockCall:
    """The arguments one layer received in a plain pass, replayable on replica rows.

    The hidden state is the first positional argument (as BERT and Llama layers are called).
    """

    args: tuple
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> Tensor:
        return self.args[0]

    def run(self, block: nn.Module) -> Tensor:
        """The layer on the arguments it received."""
        return _hidden_output(block(*self.args, **self.kwargs))

    def run_on_rows(self, block: nn.Module, hidden: Tensor, rows: Tensor, memo: dict[int, Any]) -> Tensor:
        """The layer on ``hidden``, whose row ``r`` belongs to text ``rows[r]``: per-text arguments are
        selected to match (``memo`` shares the selections between layers)."""
        num_texts = self.hidden.shape[0]
        args = tuple(_select_rows(value, rows, num_texts, memo) for value in self.args[1:])
        kwargs = {key: _select_rows(value, rows, num_texts, memo) for key, value in self.kwargs.items()}
        return _hidden_output(block(hidden, *args, **kwargs))


def _hidden_output(output: Tensor | tuple) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _select_rows(value: Any, rows: Tensor, num_texts: int, memo: dict[int, Any]) -> Any:
    """Per-text tensors (leading dimension = number of texts) row-selected; anything else as is.

    Tensors whose leading 1 is a broadcast, not the batch (rotary tables), broadcast already; with a
    single text they are selected too, which is harmless.
    """
    if isinstance(value, (tuple, list)):
        return type(value)(_select_rows(item, rows, num_texts, memo) for item in value)
    if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] == num_texts:
        if id(value) not in memo:
            memo[id(value)] = value.index_select(0, rows)
        return memo[id(value)]
    return value


@dataclass(frozen=True)
class _TextGroup:
    """Texts attributed in the same passes, collated on their own, with their plain pass recorded."""

    texts: Tensor
    """Their rows in the caller's batch."""
    attention_mask: Tensor
    block_calls: list[_BlockCall]


def _text_groups(
    encoder: TextEncoder, blocks: nn.ModuleList, batch: dict[str, Tensor], texts_per_pass: int
) -> list[_TextGroup]:
    """The batch's texts, shortest first, in groups of ``texts_per_pass``, each re-collated by the encoder.

    A group holds only its own texts' tokens (plus the padding the encoder itself adds, which for
    ``eos_reference`` is part of the published input), so padding for longer texts of the batch costs
    no compute, and a text's scores do not depend on the other texts of the batch; except for the
    published readings that depend on the batch's padding (``TextEncoder.pads_to_batch``), whose groups
    the encoder pads to the batch's width, as the published code pads its batch.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    token_ids = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
    order = sorted(range(len(token_ids)), key=lambda text: len(token_ids[text]))
    groups = []
    for start in range(0, len(order), texts_per_pass):
        members = order[start : start + texts_per_pass]
        collated = {
            key: value.to(input_ids.device)
            for key, value in encoder.collate([token_ids[i] for i in members], batch_width=input_ids.shape[1]).items()
        }
        groups.append(
            _TextGroup(
                texts=torch.tensor(members, device=input_ids.device),
                attention_mask=collated["attention_mask"],
                block_calls=_record_block_calls(encoder.transformer, blocks, collated),
            )
        )
    return groups


def _record_block_calls(transformer: nn.Module, blocks: nn.ModuleList, batch: dict[str, Tensor]) -> list[_BlockCall]:
    """One forward without replicas: the arguments of every layer."""
    block_calls: list[_BlockCall] = [None] * len(blocks)

    def record(index: int):
        def hook(module, args, kwargs):
            block_calls[index] = _BlockCall(args, kwargs)

        return hook

    handles = [block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return block_calls


def _replica_pass(
    encoder: TextEncoder,
    blocks: nn.ModuleList,
    final: nn.Module,
    group: _TextGroup,
    target: Target,
    alphas: Tensor,
    objective: ObjectiveFunction = pooled_norm,
) -> tuple[Tensor, Tensor]:
    """``g_k = dF_k/dY'_k`` ``[len(alphas), texts, tokens, out]`` and the module's input ``X``
    ``[texts, tokens, in]`` for the texts of ``group``.

    Runs the target's layer on the texts, with the target's output replicated as ``alpha_k Y``, and the
    layers above it on the flattened replicas (see the module docstring).
    """
    call = group.block_calls[target.layer]
    captured: dict[str, Tensor] = {}

    def replicate_scaled(module, args, output):
        factors = alphas.to(output.device, output.dtype).view(-1, *([1] * output.dim()))
        captured["input"], captured["output"] = args[0], (output.unsqueeze(0) * factors).requires_grad_()
        return captured["output"]

    handle = target.module.register_forward_hook(replicate_scaled)
    try:
        with torch.enable_grad():
            hidden = call.run(blocks[target.layer])
            if hidden.shape != (len(alphas), *call.hidden.shape):
                raise RuntimeError(
                    f"layer {target.layer} did not broadcast the replicas of '{target.name}' to its output "
                    f"(got shape {tuple(hidden.shape)}); chunked feed-forward is not supported"
                )
            rows = torch.arange(call.hidden.shape[0], device=hidden.device).repeat(len(alphas))
            hidden = hidden.flatten(0, 1)
            memo: dict[int, Any] = {}
            for index in range(target.layer + 1, len(blocks)):
                hidden = group.block_calls[index].run_on_rows(blocks[index], hidden, rows, memo)
            pooled = encoder.pool(final(hidden), group.attention_mask.index_select(0, rows))
            values = objective(pooled.to(accumulation_dtype(pooled.dtype)), group.texts.index_select(0, rows))
            (gradients,) = torch.autograd.grad(values.sum(), captured["output"])
    finally:
        handle.remove()
    return gradients, captured["input"]


class _ReplicaHook:
    """A forward hook that turns a module's output ``Y`` into ``alpha_k Y + probe_k`` while a pass arms it.

    For compiled passes: registered once on every module that can be a target before anything is
    compiled, so the hooks a compiled layer was traced with are the hooks it runs with. Unarmed
    (``alphas is None``) it leaves the output alone. ``probe`` is a zero tensor
    ``[len(alphas), *Y.shape]`` that requires grad: ``dF/d probe`` is ``g_k``, the gradient at the
    scaled output, and, being an input of the compiled graph, it gets its gradient through the compiled
    backward (an intermediate tensor of a compiled graph would not).
    """

    def __init__(self) -> None:
        self.alphas: Tensor | None = None
        self.probe: Tensor | None = None
        self.input: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if self.alphas is None:
            return None
        self.input = args[0]
        return output.unsqueeze(0) * self.alphas.view(-1, *([1] * output.dim())) + self.probe


def _run_block(block: nn.Module, hidden: Tensor, args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """One layer on ``hidden`` with the other arguments it was recorded with: what compiled passes compile."""
    return _hidden_output(block(hidden, *args, **kwargs))


_COMPILED_BLOCKS: dict[str, Any] = {}
"""``torch.compile(_run_block)`` by backend: one per process, so its compiled graphs are reused by every
call (layers share them: modules are inputs of the graph, not constants)."""

_DYNAMO_SETTINGS = {
    "skip_nnmodule_hook_guards": False,
    "force_nn_module_property_static_shapes": False,
    "recompile_limit": 64,
}
"""Guard on every module's hooks (a hook added or removed anywhere in a layer recompiles it, rather than
being ignored, which dynamo's default allows); let the tensors a hook reads (reached through the module,
hence static by default) have dynamic sizes, so that one graph serves every text length and number of
replicas; room for the graphs of several models, dtypes and armed kinds."""


def _no_duck_shapes():
    """Sizes that happen to be equal when a layer is traced (replicas and tokens, say) stay distinct
    symbols, rather than becoming one symbol whose equality is guarded (a recompile when they part)."""
    from torch.fx.experimental import _config as shape_config

    return shape_config.patch(use_duck_shape=False)


class _CompiledPasses:
    """Replica passes whose layers run compiled, with the scaling inside the compiled graphs.

    Registers a :class:`_ReplicaHook` on every module of every target kind of the family (whatever the
    targets) in every layer; :meth:`close` removes them. A pass arms the target's hook, runs the target's
    layer, disarms it and runs the layers above: each layer call is ``torch.compile(_run_block)``, with
    dynamic shapes (texts, tokens and replicas vary between passes), under :data:`_DYNAMO_SETTINGS`.
    Parameters that require grad are switched off meanwhile: a compiled backward computes the gradient
    of every input that requires it, asked for or not.
    """

    def __init__(self, family: ArchitectureFamily, blocks: nn.ModuleList, backend: str):
        if backend not in _COMPILED_BLOCKS:
            _COMPILED_BLOCKS[backend] = torch.compile(_run_block, backend=backend, dynamic=True)
        self.run_block = _COMPILED_BLOCKS[backend]
        self.hooks: dict[nn.Module, _ReplicaHook] = {}
        self.handles = []
        for block in blocks:
            for path, _ in family.kinds.values():
                module = block.get_submodule(path)
                self.hooks[module] = _ReplicaHook()
                self.handles.append(module.register_forward_hook(self.hooks[module]))
        self.frozen = [parameter for parameter in blocks.parameters() if parameter.requires_grad]
        for parameter in self.frozen:
            parameter.requires_grad_(False)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for parameter in self.frozen:
            parameter.requires_grad_(True)

    def replica_pass(
        self,
        encoder: TextEncoder,
        blocks: nn.ModuleList,
        final: nn.Module,
        group: _TextGroup,
        target: Target,
        alphas: Tensor,
        objective: ObjectiveFunction = pooled_norm,
    ) -> tuple[Tensor, Tensor]:
        """:func:`_replica_pass`, compiled."""
        call = group.block_calls[target.layer]
        hook = self.hooks[target.module]
        dtype = target.module.weight.dtype
        shape = (len(alphas), *call.hidden.shape[:-1], target.module.out_features)
        hook.alphas = alphas.to(call.hidden.device, dtype)
        hook.probe = probe = torch.zeros(shape, dtype=dtype, device=call.hidden.device, requires_grad=True)
        try:
            with torch.enable_grad(), torch._dynamo.config.patch(_DYNAMO_SETTINGS), _no_duck_shapes():
                hidden = self.run_block(blocks[target.layer], call.hidden, call.args[1:], call.kwargs)
                module_input = hook.input
                hook.alphas = hook.probe = hook.input = None
                if hidden.shape != (len(alphas), *call.hidden.shape):
                    raise RuntimeError(
                        f"layer {target.layer} did not broadcast the replicas of '{target.name}' to its output "
                        f"(got shape {tuple(hidden.shape)}); chunked feed-forward is not supported"
                    )
                rows = torch.arange(call.hidden.shape[0], device=hidden.device).repeat(len(alphas))
                # A copy, not a view: the layers above then all get a plain tensor, and share one graph.
                hidden = hidden.flatten(0, 1).clone()
                memo: dict[int, Any] = {}
                for index in range(target.layer + 1, len(blocks)):
                    upper = group.block_calls[index]
                    args = tuple(_select_rows(value, rows, len(call.hidden), memo) for value in upper.args[1:])
                    kwargs = {key: _select_rows(v, rows, len(call.hidden), memo) for key, v in upper.kwargs.items()}
                    hidden = self.run_block(blocks[index], hidden, args, kwargs)
                pooled = encoder.pool(final(hidden), group.attention_mask.index_select(0, rows))
                values = objective(pooled.to(accumulation_dtype(pooled.dtype)), group.texts.index_select(0, rows))
                (gradients,) = torch.autograd.grad(values.sum(), probe)
        finally:
            hook.alphas = hook.probe = hook.input = None
        return gradients, module_input.detach()
