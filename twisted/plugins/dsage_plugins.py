"""twistd plugins: `twist dsage-server` and `twist dsage-worker`."""
from twisted.application.service import ServiceMaker

dsage_server = ServiceMaker("dsage server", "dsage.server.tap", "The dsage job server.", "dsage-server")
dsage_worker = ServiceMaker("dsage worker", "dsage.worker.tap", "A dsage worker.", "dsage-worker")
