from pyproxy.cli import main

main()
