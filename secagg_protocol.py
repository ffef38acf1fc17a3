"""SecAgg+'s protocol among parties (Bell et al., CCS 2020; Bonawitz et al., CCS 2017), built
from flwr's secure-aggregation primitives: the server learns the sum of the survivors' inputs
modulo M = 2^bits and nothing else, even when parties drop after sharing their keys.

The stages, each one message a party: (1) a party advertises two public keys (one for pairwise
masks, one to encrypt shares); (2) it Shamir-shares its secret mask key and a fresh self-mask
seed among its neighbours (threshold t), each share encrypted for its recipient; (3) it sends
its input plus its self mask, plus or minus a mask shared with each neighbour that shared its
keys (the pairwise masks cancel in the sum); (4) for each neighbour that sent an input it
reveals its share of that neighbour's self-mask seed, for each that did not, its share of that
neighbour's mask key, so the server can remove the self masks of the living and the pairwise
masks of the dropped, never both for one party.

Key agreement (ECDH, HKDF), encryption (Fernet) and Shamir's sharing are flwr's
(`flwr.common.secure_aggregation`, `flwr.supercore.primitives.asymmetric`, as flwr's own
secaggplus_mod uses them). The masks are not flwr's `pseudo_rand_gen`, which seeds NumPy's
Mersenne Twister with the seed folded to 32 bits, few enough to search: they are AES-256 in
counter mode keyed by the whole 32-byte secret (the `cryptography` package flwr depends on), as
in Bonawitz et al. Every secret is drawn from the operating system; the sum does not depend on
them, so the results stay reproducible.

Every party is every other's neighbour here (SecAgg's complete graph): SecAgg+'s saving, a
sparse graph of about log n neighbours, matters for hundreds of parties, and a run has as many
parties as SuperNodes.
"""

import base64
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (decrypt, encrypt,
                                                                         generate_shared_key)
from flwr.common.secure_aggregation.secaggplus_utils import (share_keys_plaintext_concat,
                                                             share_keys_plaintext_separate)
from flwr.supercore.primitives.asymmetric import (bytes_to_private_key, bytes_to_public_key,
                                                  generate_key_pairs, private_key_to_bytes,
                                                  public_key_to_bytes)


class BelowThreshold(Exception):
    """Fewer than the threshold of parties answered: the sum cannot be unmasked."""


def masks(secret, shapes, bits):
    """Uniform integers modulo 2^bits of `shapes`, from AES-256-CTR keyed by a 32-byte secret
    (a shared key as flwr derives it, base64 of 32 bytes, or a self-mask seed)."""
    key = base64.urlsafe_b64decode(secret) if len(secret) == 44 else secret
    sizes = [int(np.prod(shape)) for shape in shapes]
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = np.frombuffer(encryptor.update(bytes(8 * sum(sizes))), "<u8").astype(np.uint64)
    stream = stream & np.uint64(2**bits - 1)
    ends = np.cumsum(sizes)
    return [stream[end - size:end].reshape(shape)
            for size, end, shape in zip(sizes, ends, shapes)]


class Party:
    """One party (a SuperNode) of one aggregation: its secrets and what it received."""

    def __init__(self, party_id, threshold, bits):
        self.id, self.threshold, self.bits = int(party_id), threshold, bits
        mask_key, share_key = generate_key_pairs(), generate_key_pairs()
        self.mask_secret = private_key_to_bytes(mask_key[0])
        self.share_secret = private_key_to_bytes(share_key[0])
        self.public_keys = (public_key_to_bytes(mask_key[1]), public_key_to_bytes(share_key[1]))
        self.seed = os.urandom(32)
        self.neighbours, self.shares = {}, {}  # id -> public keys; owner -> (seed, key) shares

    def fields(self):
        """Everything the party holds, as plain values (ids, numbers, byte strings and lists
        of them), for a node that keeps it between messages."""
        neighbours, owners = sorted(self.neighbours), sorted(self.shares)
        return {"id": self.id, "threshold": self.threshold, "bits": self.bits,
                "mask-secret": self.mask_secret, "share-secret": self.share_secret,
                "public-keys": list(self.public_keys), "seed": self.seed,
                "neighbours": neighbours,
                "neighbour-mask": [self.neighbours[node][0] for node in neighbours],
                "neighbour-share": [self.neighbours[node][1] for node in neighbours],
                "owners": owners, "seed-shares": [self.shares[owner][0] for owner in owners],
                "key-shares": [self.shares[owner][1] for owner in owners]}

    @classmethod
    def from_fields(cls, fields):
        """The party `fields()` described."""
        party = cls.__new__(cls)
        party.id, party.threshold, party.bits = (int(fields["id"]), int(fields["threshold"]),
                                                 int(fields["bits"]))
        party.mask_secret, party.share_secret = fields["mask-secret"], fields["share-secret"]
        party.public_keys, party.seed = tuple(fields["public-keys"]), fields["seed"]
        party.neighbours = {int(node): (mask, share) for node, mask, share in zip(
            fields["neighbours"], fields["neighbour-mask"], fields["neighbour-share"])}
        party.shares = {int(owner): (seed, key) for owner, seed, key in zip(
            fields["owners"], fields["seed-shares"], fields["key-shares"])}
        return party

    def share_keys(self, public_keys):
        """Stage 2: {neighbour id: its two public keys} (this party among them) ->
        {neighbour id: the encrypted shares of this party's seed and mask key}."""
        self.neighbours = {int(node): keys for node, keys in public_keys.items()}
        count = len(self.neighbours)
        seeds = create_shares(self.seed, self.threshold, count)
        keys = create_shares(self.mask_secret, self.threshold, count)
        sent = {}
        for position, node in enumerate(sorted(self.neighbours)):
            if node == self.id:
                self.shares[node] = (seeds[position], keys[position])
                continue
            plaintext = share_keys_plaintext_concat(self.id, node, seeds[position],
                                                    keys[position])
            sent[node] = encrypt(self._channel(node), plaintext)
        return sent

    def masked_input(self, vector, received):
        """Stage 3: `vector` (integer layers modulo 2^bits) masked, given the shares
        {sender: ciphertext} the server forwarded; parties that sent none are left out."""
        masked = [np.asarray(layer, np.uint64) for layer in vector]
        shapes = [layer.shape for layer in masked]
        masked = _add(masked, masks(self.seed, shapes, self.bits), self.bits)
        own_key = bytes_to_private_key(self.mask_secret)
        for sender, ciphertext in sorted(received.items()):
            source, target, seed_share, key_share = share_keys_plaintext_separate(
                decrypt(self._channel(sender), ciphertext))
            if (source, target) != (sender, self.id):
                raise ValueError(f"party {self.id}: a share from {sender} was addressed "
                                 f"{source} -> {target}")
            self.shares[sender] = (seed_share, key_share)
            pairwise = masks(generate_shared_key(
                own_key, bytes_to_public_key(self.neighbours[sender][0])), shapes, self.bits)
            masked = (_add if self.id > sender else _subtract)(masked, pairwise, self.bits)
        return masked

    def unmask(self, alive, dropped):
        """Stage 4: {party: share} of the seeds of the `alive`, of the mask keys of the
        `dropped`; never both for one party (that would reveal its input)."""
        if set(alive) & set(dropped):
            raise ValueError(f"party {self.id}: parties both alive and dropped: "
                             f"{sorted(set(alive) & set(dropped))}")
        return {**{node: self.shares[node][0] for node in alive if node in self.shares},
                **{node: self.shares[node][1] for node in dropped if node in self.shares}}

    def _channel(self, node):
        return generate_shared_key(bytes_to_private_key(self.share_secret),
                                   bytes_to_public_key(self.neighbours[node][1]))


def unmasked_sum(masked, revealed, public_keys, threshold, bits):
    """The server's last step: the sum of the alive parties' inputs modulo 2^bits.

    Args:
        masked: {alive party: its masked input (integer layers)}.
        revealed: {party that answered stage 4: its {owner: share}}.
        public_keys: {party: its two public keys} of every party that shared keys.
    Raises:
        BelowThreshold: some party's secret has fewer than `threshold` shares.
    """
    alive = sorted(masked)
    shapes = [np.shape(layer) for layer in masked[alive[0]]]
    total = [np.zeros(shape, np.uint64) for shape in shapes]
    for node in alive:
        total = _add(total, [np.asarray(layer, np.uint64) for layer in masked[node]], bits)
    for owner in sorted(public_keys):
        shares = [given[owner] for given in revealed.values() if owner in given]
        if len(shares) < threshold:
            raise BelowThreshold(f"party {owner}'s secret has {len(shares)} shares, fewer "
                                 f"than the threshold {threshold}")
        secret = combine_shares(shares)
        if owner in masked:
            total = _subtract(total, masks(secret, shapes, bits), bits)
            continue
        key = bytes_to_private_key(secret)
        for node in alive:  # the masks the living added for the dropped owner
            pairwise = masks(generate_shared_key(key, bytes_to_public_key(
                public_keys[node][0])), shapes, bits)
            total = (_add if owner > node else _subtract)(total, pairwise, bits)
    return total


def _add(first, second, bits):
    mask = np.uint64(2**bits - 1)
    return [(one + two) & mask for one, two in zip(first, second)]


def _subtract(first, second, bits):
    mask = np.uint64(2**bits - 1)
    return [(one - two) & mask for one, two in zip(first, second)]
