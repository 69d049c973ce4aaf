"""Servicers registered before the port opens, answering UNAVAILABLE until the server has loaded.

grpc.aio takes no servicer once a server has started, and the port opens first so that health
probes get NOT_SERVING while the engine loads (a minute on a small CPU). These fronts are
registered with the port; a call before loading ends gets UNAVAILABLE (retry, or another
replica) instead of UNIMPLEMENTED, and every later call goes to the real servicer.
"""

from __future__ import annotations

from retroserve.v1 import admin_pb2_grpc, retroserve_pb2_grpc
from server.errors import NotReady

LOADING = "the server is still loading its model and datastore; retry shortly (health is NOT_SERVING until then)"


class _Front:
    target = None

    def _ready(self):
        if self.target is None:
            raise NotReady(LOADING)
        return self.target


class RetroserveFront(_Front, retroserve_pb2_grpc.RetroserveServicer):
    async def Generate(self, request, context):
        return await self._ready().Generate(request, context)

    async def GenerateStream(self, request, context):
        async for message in self._ready().GenerateStream(request, context):
            yield message

    async def Retrieve(self, request, context):
        return await self._ready().Retrieve(request, context)

    async def Tokenize(self, request, context):
        return await self._ready().Tokenize(request, context)

    async def Info(self, request, context):
        return await self._ready().Info(request, context)


class AdminFront(_Front, admin_pb2_grpc.AdminServicer):
    async def ReloadDatastore(self, request, context):
        return await self._ready().ReloadDatastore(request, context)
