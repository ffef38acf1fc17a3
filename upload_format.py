"""What the clients and the server both speak: the upload, its encodings and the update maths.

A client sends its update y_i - x encoded (the seed's Local_compression_ / uncompression_):
none: float32 values; int8: per-tensor 8-bit codes with an offset and a step; topk: the largest
entries with their flat indices. `layer_arrays` is the format's one definition of which arrays
an encoded layer holds, with their dtypes and shapes: encoding, the byte count, scaling and the
server's checks all follow it. The update maths both sides compute (norms, clipping, local step
counts) live here too, so the server never imports the client (Client_side and Server_side
are peers below Main.py), as Flower keeps what both sides share in `flwr.common`.
"""

import dataclasses
import typing

import numpy as np

COMPRESSIONS = ("none", "int8", "topk")
# Kinds of problem an upload can have; a round whose every upload is NON_FINITE diverged.
MALFORMED, NON_FINITE = "malformed", "non_finite"


@dataclasses.dataclass
class Upload:
    """What one client sends the server after a round.

    update: its encoded update y_i - x (see `encode_update`); num_examples: the samples it
    trained on; num_steps: its local SGD steps; train_loss: mean cross-entropy of its last
    epoch; extras: what its algorithm uploads besides, {name: float32 layers, uncompressed}
    (e.g. SCAFFOLD's variate change c_i+ - c_i; see algorithms.Algorithm.UPLOADED).
    """

    client: int
    round_num: int
    update: list
    num_examples: int
    num_steps: int
    train_loss: float
    extras: dict = dataclasses.field(default_factory=dict)
    node: int = None  # the id of the Flower node that delivered it; None in process

    def __post_init__(self):
        if self.extras is None:  # nothing besides the update
            self.extras = {}

    def to_arrays(self):
        """Flatten into (arrays by name, metrics by name), the form any transport carries."""
        arrays = {f"update.{layer}.{key}": np.asarray(value)
                  for layer, encoded in enumerate(self.update) for key, value in encoded.items()}
        for name, layers in self.extras.items():
            arrays.update({f"extra.{layer}.{name}": np.asarray(value)
                           for layer, value in enumerate(layers)})
        metrics = {"client": self.client, "round_num": self.round_num,
                   "num_examples": self.num_examples, "num_steps": self.num_steps,
                   "train_loss": self.train_loss}
        return arrays, metrics

    @classmethod
    def from_arrays(cls, arrays, metrics):
        """Rebuild an Upload from what `to_arrays` returned."""
        parts = {"update": {}, "extra": {}}
        for name, value in arrays.items():
            kind, layer, key = name.split(".")
            parts[kind].setdefault(key, {})[int(layer)] = value
        update = {}
        for key, layers in parts["update"].items():
            for layer, value in layers.items():
                update.setdefault(layer, {})[key] = value
        return cls(int(metrics["client"]), int(metrics["round_num"]),
                   [update[layer] for layer in sorted(update)], int(metrics["num_examples"]),
                   int(metrics["num_steps"]), float(metrics["train_loss"]),
                   {name: [layers[layer] for layer in sorted(layers)]
                    for name, layers in parts["extra"].items()})


class Problem(typing.NamedTuple):
    """Why an upload cannot be used: its kind (MALFORMED, NON_FINITE, ...) and a sentence."""

    kind: str
    text: str


# --- The encodings ----------------------------------------------------------------------------

def layer_arrays(compression, shape, topk_fraction):
    """Return {array name: (dtype, shape)} of one encoded layer of `shape`: the format itself.

    Scalars are 0-d arrays; every array crosses the wire and is counted in bytes.
    """
    shape = tuple(shape)
    if compression == "none":
        return {"values": (np.float32, shape)}
    if compression == "int8":
        return {"codes": (np.uint8, shape), "offset": (np.float32, ()), "step": (np.float32, ())}
    count = topk_count(int(np.prod(shape)), topk_fraction)
    return {"indices": (np.int32, (count,)), "values": (np.float32, (count,))}


def topk_count(size, topk_fraction):
    """Return how many entries top-k sends of a tensor of `size`: ceil(fraction x size), >= 1."""
    return min(size, max(1, int(np.ceil(topk_fraction * size))))


def encode_update(delta, compression, rng=None, topk_fraction=0.01, stochastic_rounding=False):
    """Encode an update for upload, one dict of arrays per layer (see `layer_arrays`).

    none: the float32 values. int8: per-tensor uniform 8-bit codes q in 0..255 with the offset
    (the minimum) and the step ((max - min) / 255), so x ~ offset + q * step; rounding to nearest,
    or stochastic (unbiased, needs `rng`). topk: the ceil(topk_fraction * size) entries of largest
    magnitude, as int32 flat indices (sorted) and float32 values.
    """
    return [_encode_layer(np.asarray(layer, np.float64), compression, rng, topk_fraction,
                          stochastic_rounding) for layer in delta]


def _encode_layer(layer, compression, rng, topk_fraction, stochastic_rounding):
    if compression == "none":
        return {"values": layer.astype(np.float32)}
    flat = layer.ravel()
    if compression == "int8":
        low, high = (flat.min(), flat.max()) if flat.size else (0.0, 0.0)
        step = (high - low) / 255 if high > low else 1.0
        scaled = (flat - low) / step
        codes = np.floor(scaled + rng.random(flat.size)) if stochastic_rounding else np.rint(scaled)
        return {"codes": np.clip(codes, 0, 255).astype(np.uint8).reshape(layer.shape),
                "offset": np.array(low, np.float32), "step": np.array(step, np.float32)}
    count = topk_count(flat.size, topk_fraction)
    indices = np.sort(np.argpartition(np.abs(flat), flat.size - count)[flat.size - count:])
    return {"indices": indices.astype(np.int32), "values": flat[indices].astype(np.float32)}


def decode_update(encoded, shapes):
    """Turn encode_update's output back into float64 layer arrays of `shapes` (the shapes are
    the model's, known to both sides)."""
    return [_decode_layer(layer, shape) for layer, shape in zip(encoded, shapes, strict=True)]


def _decode_layer(layer, shape):
    if "codes" in layer:
        return np.float64(layer["offset"]) + np.float64(layer["step"]) * layer["codes"]
    if "indices" in layer:
        dense = np.zeros(int(np.prod(shape)))
        dense[layer["indices"]] = layer["values"]
        return dense.reshape(shape)
    return np.float64(layer["values"])


def encoded_bytes(encoded):
    """Return the bytes an encoded update takes on the wire: the sizes of its arrays."""
    return int(sum(np.asarray(value).nbytes for layer in encoded for value in layer.values()))


def encoded_size(compression, shapes, topk_fraction):
    """The bytes an upload of `shapes` takes in `compression`, known before it is made."""
    return int(sum(np.dtype(dtype).itemsize * int(np.prod(shape))
                   for layer_shape in shapes
                   for dtype, shape in layer_arrays(compression, layer_shape,
                                                    topk_fraction).values()))


def scale_encoded(encoded, factor):
    """Multiply the update an encoding stands for by `factor`, keeping its format.

    In every encoding the decoded value is linear in its float arrays (values; offset and step),
    while codes and indices stay as they are.
    """
    return [{name: (np.asarray(np.float64(array) * factor, np.float32)
                    if np.asarray(array).dtype == np.float32 else array)
             for name, array in layer.items()} for layer in encoded]


# --- The server's checks of what arrived --------------------------------------------------------

def update_problem(update, compression, topk_fraction, shapes):
    """Return the Problem of an encoded update (names, dtypes, shapes, values), or None."""
    if not isinstance(update, list) or len(update) != len(shapes):
        return Problem(MALFORMED, f"the update must have {len(shapes)} layers")
    for index, (layer, shape) in enumerate(zip(update, shapes)):
        expected = layer_arrays(compression, shape, topk_fraction)
        if not isinstance(layer, dict) or set(layer) != set(expected):
            found = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
            return Problem(MALFORMED, f"layer {index} holds {found}, {compression} sends "
                                      f"{sorted(expected)}")
        problem = (_arrays_problem(layer, expected)
                   or _values_problem(layer, int(np.prod(shape))))
        if problem:
            return problem._replace(text=f"layer {index}: {problem.text}")
    return None


def extras_problem(extras, names, shapes):
    """What the algorithm uploads besides the update: exactly `names`, each float32 layers of
    the model's shapes."""
    if not isinstance(extras, dict) or set(extras) != set(names):
        found = sorted(extras) if isinstance(extras, dict) else type(extras).__name__
        return Problem(MALFORMED, f"sends extras {found}, its algorithm uploads "
                                  f"{sorted(names)}")
    for name in names:
        layers = extras[name]
        if not isinstance(layers, list) or len(layers) != len(shapes):
            return Problem(MALFORMED, f"its {name} must have {len(shapes)} layers")
        for index, (layer, shape) in enumerate(zip(layers, shapes)):
            problem = array_problem(layer, np.float32, tuple(shape), f"{name} layer {index}")
            if problem:
                return problem
    return None


def _arrays_problem(layer, expected):
    for name, (dtype, shape) in expected.items():
        problem = array_problem(layer[name], dtype, shape, name)
        if problem:
            return problem
    return None


def _values_problem(layer, size):
    """What dtypes and shapes cannot say: int8's step is >= 0, top-k's indices are distinct
    positions of the tensor."""
    if "step" in layer and layer["step"] < 0:
        return Problem(MALFORMED, "step is negative")
    if "indices" in layer:
        indices = layer["indices"]
        if indices.min() < 0 or indices.max() >= size:
            return Problem(MALFORMED, f"a top-k index is outside 0..{size - 1}")
        if len(np.unique(indices)) != len(indices):
            return Problem(MALFORMED, "a top-k index repeats")
    return None


def array_problem(array, dtype, shape, name):
    """Return the Problem of one received array (type, dtype, shape, finite values), or None."""
    if not isinstance(array, np.ndarray):
        return Problem(MALFORMED, f"{name} is not an array")
    if array.dtype != dtype:
        return Problem(MALFORMED, f"{name} has dtype {array.dtype}, expected {np.dtype(dtype)}")
    if array.shape != shape:
        return Problem(MALFORMED, f"{name} has shape {array.shape}, expected {shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return Problem(NON_FINITE, f"{name} holds NaN or infinity")
    return None


# --- Update maths both sides compute ------------------------------------------------------------

def num_local_steps(num_examples, batch_size, local_epochs):
    """Return the SGD steps of E epochs over n samples in batches of B (0: one full batch)."""
    return local_epochs * -(-num_examples // (batch_size or num_examples))


def samples_in_steps(num_examples, batch_size, num_steps):
    """Return the samples of a client's first num_steps local steps (only an epoch's last batch
    is short; B = 0 is one full batch): its partial work, or E n for all its steps."""
    epochs, steps = divmod(num_steps, num_local_steps(num_examples, batch_size, 1))
    return epochs * num_examples + steps * (batch_size or num_examples)


def samples_in_uploads(uploads, batch_size):
    """Return the samples the uploads' local steps took in all (`samples_in_steps` of each)."""
    return sum(samples_in_steps(upload.num_examples, batch_size, upload.num_steps)
               for upload in uploads)


def effective_steps(num_steps, momentum):
    """Return a_i = ||a_i||_1, how far tau local steps move the weights, in units of eta * g.

    Under a constant gradient g, tau steps of SGD move the weights by tau * eta * g; with
    momentum rho (Keras' v = rho v - eta g, w = w + v, v starting at 0) by
    (tau - rho (1 - rho**tau) / (1 - rho)) / (1 - rho) * eta * g (Wang et al. 2020, eq. 9).
    FedNova normalizes by it, and SCAFFOLD's variate needs it to turn a change of weights back
    into a mean gradient.
    """
    if momentum == 0:
        return float(num_steps)
    return (num_steps - momentum * (1 - momentum ** num_steps) / (1 - momentum)) / (1 - momentum)


def update_norm(delta):
    """Return the L2 norm of an update over all its layers."""
    return float(np.sqrt(sum(np.sum(np.square(np.float64(layer))) for layer in delta)))


def clip_update(delta, clip_norm):
    """Scale an update down to L2 norm `clip_norm` if it is longer (DP-FedAvg's clipping)."""
    norm = update_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [factor * np.float64(layer) for layer in delta]
