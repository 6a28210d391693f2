from pyproxy.server import main

main()
