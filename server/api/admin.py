"""The `retroserve.v1.Admin` servicer: operations on a running server (admin.proto).

Bearer tokens guard it like every other service (server/api/auth.py); the swap itself lives in
server/core/hot_swap.py.
"""

from __future__ import annotations

from pathlib import Path

from retroserve.v1 import admin_pb2, admin_pb2_grpc
from server.api import pb_convert
from server.errors import DatastoreUnavailable


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, datastores=None):
        """`datastores`: the server.core.hot_swap.DatastoreSlot serving, None without a datastore."""
        self.datastores = datastores

    async def ReloadDatastore(self, request: admin_pb2.ReloadDatastoreRequest, context):
        if self.datastores is None:
            raise DatastoreUnavailable(
                "this server runs without a datastore (--no-datastore), so there is none to reload; "
                "restart it with --datastore-dir"
            )
        swap = await self.datastores.reload(Path(request.path) if request.path else None)
        return admin_pb2.ReloadDatastoreResponse(
            datastore=pb_convert.datastore_info_to_pb(swap.current, with_path=True),
            previous=pb_convert.datastore_info_to_pb(swap.previous, with_path=True),
            load_ms=swap.load_s * 1000.0,
        )
