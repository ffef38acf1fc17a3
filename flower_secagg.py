"""SecAgg+ on Flower: the protocol's stages as messages of flower_app's ServerApp and ClientApp.

The parties are the SuperNodes; a node that hosts several clients masks the sum of its accepted
clients' contributions (secure_aggregation.contribution, the same as in process). A round:

0. train (flower_app's round message): a node trains its clients, keeps their contributions in
   its Flower context, starts a party (secagg_protocol.Party) and replies with each client's
   sample count, steps and loss, its update HELD, plus the party's two public keys. The server
   screens those uploads as ever and decides which it accepts.
1. share keys: every node that advertised keys gets all of them and the threshold t; it replies
   with its secrets' shares, each encrypted for its recipient.
2. masked input: each node that shared gets the shares addressed to it and the list of its
   clients the server accepted; it replies with the masked modular sum of their contributions.
3. unmask: the nodes that sent a masked input reveal their shares of the living nodes' self-mask
   seeds and of the dropped nodes' mask keys; the server removes the masks.

The server process never holds one node's unmasked sum (nor one client's contribution): a sum
of fewer than MIN_CONTRIBUTORS nodes with accepted clients is not unmasked. A node that drops
after sharing its keys is unmasked from the others' shares and its clients are left out of the
round; when fewer than t nodes reveal, or too few nodes contribute, nothing is unmasked and the
round keeps the model. The sum is the one the in-process run takes of the same accepted
clients, so the two engines give the same weights bit for bit.
"""

import collections
import dataclasses
import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

import secagg_protocol
import secure_aggregation

SHARE_TYPE, MASK_TYPE, UNMASK_TYPE = ("query.secagg_share", "query.secagg_mask",
                                      "query.secagg_unmask")
PARTY, KEYS, STAGE, MASKED = "secagg.party", "secagg.keys", "secagg", "secagg.masked"
CONTRIBUTION = "secagg.contribution."
DROPPED = "its node left the secure sum after sharing its keys"
NO_PARTY = "its node did not take part in the secure sum"
LOGGER = logging.getLogger("flower_app")
# A sum is unmasked only when this many nodes with accepted clients are in it.
MIN_CONTRIBUTORS = 2


# --- The node's side ------------------------------------------------------------------------

def hold(uploads, config, context):
    """Keep the uploads' contributions in the node's state and start this round's party.

    Returns:
        (the uploads with no update, the record advertising the party's public keys).
    """
    for name in [name for name in context.state.keys() if name.startswith("secagg")]:
        del context.state[name]
    for upload in uploads:
        context.state[CONTRIBUTION + str(upload.client)] = ArrayRecord(
            [layer[secure_aggregation.KEY] for layer in upload.update])
    party = secagg_protocol.Party(context.node_id, 0, config["SECAGG_MODULUS_BITS"])
    save_party(party, context)
    return ([dataclasses.replace(upload, update=[]) for upload in uploads],
            ConfigRecord({"mask": party.public_keys[0], "share": party.public_keys[1]}))


def client_share_keys(message, context):
    """Stage 1: share this node's secrets among the nodes that advertised keys."""
    stage, party = message.content.config_records[STAGE], load_party(context)
    party.threshold = int(stage["threshold"])
    sent = party.share_keys({int(node): (mask, share) for node, mask, share
                             in zip(stage["nodes"], stage["mask"], stage["share"])})
    save_party(party, context)
    return Message(RecordDict({STAGE: ConfigRecord(
        {"to": [str(node) for node in sent], "ciphertexts": list(sent.values())})}),
        reply_to=message)


def client_masked_input(message, context):
    """Stage 2: the masked modular sum of this node's clients that the server accepted."""
    if context.node_config.get("secagg-fail-after-sharing"):
        # Lets the tests drop a node between sharing its keys and sending its input.
        raise RuntimeError("this node fails after sharing its keys (node config)")
    stage, party = message.content.config_records[STAGE], load_party(context)
    stored = {name[len(CONTRIBUTION):]: record.to_numpy_ndarrays()
              for name, record in context.state.array_records.items()
              if name.startswith(CONTRIBUTION)}
    options = {"SECAGG_MODULUS_BITS": party.bits}
    shapes = [layer.shape for layer in next(iter(stored.values()))]
    chosen = [[{secure_aggregation.KEY: layer} for layer in stored[str(client)]]
              for client in stage["clients"]]
    total = (secure_aggregation.modular_sum(chosen, options) if chosen
             else [np.zeros(shape, np.uint64) for shape in shapes])
    masked = party.masked_input(total, {int(sender): ciphertext for sender, ciphertext
                                        in zip(stage["from"], stage["ciphertexts"])})
    save_party(party, context)
    for client in stored:  # Summed: the node keeps no single contribution longer.
        del context.state[CONTRIBUTION + client]
    dtype = secure_aggregation.wire_dtype(party.bits)
    return Message(RecordDict({MASKED: ArrayRecord([layer.astype(dtype) for layer in masked])}),
                   reply_to=message)


def client_unmask(message, context):
    """Stage 3: this node's shares of the living nodes' seeds and the dropped nodes' keys."""
    stage, party = message.content.config_records[STAGE], load_party(context)
    revealed = party.unmask([int(node) for node in stage["alive"]],
                            [int(node) for node in stage["dropped"]])
    del context.state[PARTY]
    return Message(RecordDict({STAGE: ConfigRecord(
        {"owners": [str(owner) for owner in revealed], "shares": list(revealed.values())})}),
        reply_to=message)


def save_party(party, context):
    """The party's secrets and what it received, in the node's context (node ids as text:
    Flower's are unsigned 64-bit)."""
    fields = party.fields()
    context.state[PARTY] = ConfigRecord({
        name: ([str(item) for item in value] if name in IDS else
               str(value) if name == "id" else value) for name, value in fields.items()})


def load_party(context):
    record = context.state.config_records[PARTY]
    return secagg_protocol.Party.from_fields({
        name: ([int(item) for item in value] if name in IDS else
               int(value) if name == "id" else value) for name, value in record.items()})


IDS = ("neighbours", "owners")


# --- The server's side ----------------------------------------------------------------------

def advertised_keys(content):
    """A node's (mask, share) public keys from its training reply, or None."""
    try:
        record = content.config_records[KEYS]
        return bytes(record["mask"]), bytes(record["share"])
    except (KeyError, TypeError):
        return None


def secure_sum(engine, round_num, accepted, shapes, advertised):
    """Run stages 1-3 with the nodes that advertised keys this round; return a SecureSum of the
    accepted clients of the nodes whose masked input was unmasked.

    Args:
        engine: the FlowerEngine (its message helpers and config).
        advertised: {node: its two public keys} from the round's training replies.
    """
    options, meter = engine.config, Meter()
    bits = options["SECAGG_MODULUS_BITS"]
    by_node = collections.defaultdict(list)
    for upload in accepted:
        by_node[upload.node].append(upload.client)
    parties = sorted(advertised)
    meter.up += sum(len(mask) + len(share) for mask, share in advertised.values())
    threshold = secure_aggregation.threshold(options, len(parties))
    listing = ConfigRecord({"nodes": [str(node) for node in parties],
                            "mask": [advertised[node][0] for node in parties],
                            "share": [advertised[node][1] for node in parties],
                            "threshold": threshold})
    shared = _stage(engine, round_num, SHARE_TYPE, meter, {node: listing for node in parties},
                    lambda content: _all_shared(content, parties))
    forwarded = {node: ConfigRecord({
        "from": [str(sender) for sender in sorted(shared) if node in shared[sender]],
        "ciphertexts": [shared[sender][node] for sender in sorted(shared)
                        if node in shared[sender]],
        "clients": sorted(by_node.get(node, []))}) for node in shared}
    masked = _stage(engine, round_num, MASK_TYPE, meter, forwarded,
                    lambda content: _masked_sum(content, shapes, bits))
    alive, dropped = sorted(masked), sorted(set(shared) - set(masked))
    fates = ConfigRecord({"alive": [str(node) for node in alive],
                          "dropped": [str(node) for node in dropped]})
    revealed = _stage(engine, round_num, UNMASK_TYPE, meter, {node: fates for node in alive},
                      lambda content: _pairs(content, "owners", "shares"))
    contributors = [node for node in alive if by_node.get(node)]
    try:
        if len(contributors) < MIN_CONTRIBUTORS:
            # One node's sum is that node's input (one client's, across machines).
            raise secagg_protocol.BelowThreshold(
                f"{len(contributors)} node(s) with accepted clients sent an input, fewer than "
                f"{MIN_CONTRIBUTORS}: their sum would be one node's input")
        total = secagg_protocol.unmasked_sum(masked, revealed, {
            node: advertised[node] for node in shared}, threshold, bits)
    except (secagg_protocol.BelowThreshold, ValueError) as error:  # ValueError: bad shares
        why = f"nothing was unmasked ({error}): the global model is kept"
        return secure_aggregation.SecureSum(None, frozenset(), {
            upload.client: why for upload in accepted}, meter.down, meter.up)
    clients = frozenset(client for node in alive for client in by_node.get(node, []))
    return secure_aggregation.SecureSum(total, clients, {
        upload.client: DROPPED if upload.node in shared else NO_PARTY
        for upload in accepted if upload.client not in clients}, meter.down, meter.up)


@dataclasses.dataclass
class Meter:
    """The protocol's bytes: keys, shares and masked inputs, each way."""

    down: int = 0
    up: int = 0


def _stage(engine, round_num, message_type, meter, records, read):
    """Send each node its record; return {node: read(reply content)} of the nodes whose reply
    could be read (what raises in `read` counts as no reply)."""
    messages = [Message(RecordDict({STAGE: record}), dst_node_id=node,
                        message_type=message_type, group_id=str(round_num))
                for node, record in sorted(records.items())]
    meter.down += sum(_record_bytes(record) for record in records.values())
    answers = {}
    for node, content in engine._replies(round_num, messages,
                                         f"left the secure sum at {message_type}:"):
        meter.up += sum(_record_bytes(record) for record in content.config_records.values())
        meter.up += sum(array.numpy().nbytes for record in content.array_records.values()
                        for array in record.values())
        try:
            answers[node] = read(content)
        except (KeyError, TypeError, ValueError) as error:
            LOGGER.warning("round %d: node %d sent an unreadable %s reply (%s): it counts as "
                           "gone", round_num, node, message_type, error)
    return answers


def _all_shared(content, parties):
    """{recipient: ciphertext} of a node's shares, which must reach every other party: a
    missing one would leave masks that do not cancel."""
    sent = _pairs(content, "to", "ciphertexts")
    if not set(sent) <= set(parties) or len(set(parties) - set(sent)) != 1:
        raise ValueError(f"shares for {sorted(sent)}, not for every other party")
    return sent


def _pairs(content, keys, values):
    """{int(key): value} of a reply's two parallel lists."""
    record = content.config_records[STAGE]
    if len(record[keys]) != len(record[values]):
        raise ValueError(f"{len(record[keys])} {keys} but {len(record[values])} {values}")
    return {int(key): bytes(value) for key, value in zip(record[keys], record[values])}


def _masked_sum(content, shapes, bits):
    layers = content.array_records[MASKED].to_numpy_ndarrays()
    dtype = secure_aggregation.wire_dtype(bits)
    if len(layers) != len(shapes) or any(layer.dtype != dtype or layer.shape != tuple(shape)
                                         for layer, shape in zip(layers, shapes)):
        raise ValueError(f"not {len(shapes)} layers of {dtype} of the model's shapes")
    return layers


def _record_bytes(record):
    """The bytes of a stage's payload: its byte strings, and 8 a node id or number."""
    total = 0
    for value in record.values():
        for item in value if isinstance(value, list) else [value]:
            total += len(item) if isinstance(item, bytes) else 8
    return total
