from dedup.entry import main

main()
