from node0sim.app import main

main()
