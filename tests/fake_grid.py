"""An in-process stand-in for Flower's Grid: the ServerApp's engine talks to the ClientApp's
handlers directly, so tests of the protocol (which node hosts which clients, client state that
follows the server) run in seconds, on the real code of both apps, without Flower's processes.

What it keeps of a SuperLink: message ids, a reply's source node id set by the "connection"
(the node the message went to), and one Flower context (node config and state) per node that
survives between messages. It can lose a node's reply after the node has handled the message,
as a reply that misses `round-timeout` is lost to the ServerApp. A handler that raises
gives an error reply, as Flower's ClientApp does.
"""

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import flower_app
import flower_secagg

HANDLERS = {flower_app.MESSAGE_TYPE: flower_app.client_train,
            flower_app.QUERY_TYPE: flower_app.client_partition,
            flower_app.EVALUATE_TYPE: flower_app.client_evaluate,
            flower_secagg.SHARE_TYPE: flower_secagg.client_share_keys,
            flower_secagg.MASK_TYPE: flower_secagg.client_masked_input,
            flower_secagg.UNMASK_TYPE: flower_secagg.client_unmask}
SERVER_NODE_ID = 0


class FakeGrid:
    """Nodes as ClientApp handlers in this process.

    Args:
        node_configs: {node id: node config dict, e.g. {"partition-id": 0, "num-partitions": 2}}.
        lose: set of (node id, round) whose training replies are lost after the node trained.
    """

    def __init__(self, node_configs, lose=()):
        TaskIdentity.run_id, TaskIdentity.task_id = 1, 1
        TaskIdentity.node_id = SERVER_NODE_ID
        self.contexts = {node: Context(run_id=1, node_id=node, node_config=dict(config),
                                       state=RecordDict(), run_config={})
                         for node, config in node_configs.items()}
        self.lose = set(lose)
        self.waiting = {}

    def get_node_ids(self):
        return sorted(self.contexts)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = f"message-{len(self.waiting)}-{id(message)}"
            # The SuperLink assigns message ids; Metadata has no public setter for it.
            message.metadata.__dict__["_message_id"] = message_id
            self.waiting[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        """Let each addressed node handle its message now; return the replies not lost."""
        replies = []
        for message_id in message_ids:
            message = self.waiting.pop(message_id, None)
            if message is None:  # Handled already; its reply was lost.
                continue
            node = message.metadata.dst_node_id
            TaskIdentity.node_id = node  # The reply's source is the node it went to.
            try:
                reply = HANDLERS[message.metadata.message_type](message, self.contexts[node])
            except Exception as error:  # noqa: BLE001 (Flower's ClientApp replies with it)
                reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"),
                                reply_to=message)
            finally:
                TaskIdentity.node_id = SERVER_NODE_ID
            lost = (message.metadata.message_type == flower_app.MESSAGE_TYPE
                    and (node, int(message.metadata.group_id)) in self.lose)
            if not lost:
                replies.append(reply)
        return replies
