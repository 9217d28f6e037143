"""Hand-written English planning tasks: several independent dimensions to analyse, then a synthesis.

Each entry: (id, task text, dimensions, reference answer). The reference answers are the project's own, written to
be concise but substantive: one paragraph per dimension, then the synthesis.
"""

PLANNING_TASKS_EN = [
    (
        "remote-work",
        "A 40-person software company wants to move from its office to fully remote work within six months. "
        "Analyse hiring, tooling and security, team communication, and costs, then propose a transition plan.",
        ["Hiring", "Tooling and security", "Team communication", "Costs"],
        "Hiring: remote work widens the talent pool beyond commuting distance, but the company must decide which "
        "time zones it accepts (e.g. within four hours of headquarters), adapt interviews to video, and handle "
        "payroll and employment law in each new country, possibly via an employer-of-record service.\n"
        "Tooling and security: standardise on company-managed laptops with disk encryption and device management, "
        "single sign-on with hardware-key or app-based MFA, a VPN or zero-trust access for internal services, and "
        "shared tools for chat, video, documents and tickets.\n"
        "Team communication: write things down by default, set core overlap hours, keep a weekly team meeting and "
        "short daily async updates, and budget for in-person meetups once or twice a year to keep trust.\n"
        "Costs: the office lease and utilities disappear, while home-office stipends, coworking allowances, travel "
        "for meetups and more software seats appear; net savings are typical but smaller than the rent alone.\n"
        "Synthesis: run a three-month pilot with two teams while security and tooling are rolled out, fix the "
        "communication norms from what the pilot shows, then move everyone, end the lease at month six and keep the "
        "savings partly for stipends and twice-yearly meetups.",
    ),
    (
        "cafe",
        "Plan the opening of a small café in a university town. Consider location, menu and suppliers, staffing, "
        "and finances, then give an opening plan.",
        ["Location", "Menu and suppliers", "Staffing", "Finances"],
        "Location: foot traffic between campus, dorms and the library matters more than street prestige; check "
        "rent against expected daily covers, seating for students who stay long, and the drop in trade during "
        "holidays.\n"
        "Menu and suppliers: a short menu of good coffee, tea, a few pastries and simple lunch items keeps waste and "
        "training low; use one local roaster and one bakery, with a backup supplier for milk and cups.\n"
        "Staffing: two experienced baristas as the core, plus part-time students for peak hours whose schedules "
        "follow the academic calendar; train everyone on hygiene and the espresso machine.\n"
        "Finances: budget for fit-out, machine, first stock and six months of fixed costs as a reserve; price drinks "
        "so ingredients stay near 30% of price, and track break-even covers per day.\n"
        "Synthesis: pick a site on the main student route at a rent the break-even count supports, open with the "
        "short menu and a soft launch during term time, staff around lecture peaks, and review menu and hours after "
        "the first term with the sales data.",
    ),
    (
        "japan-trip",
        "A family of four wants a two-week trip to Japan in spring on a moderate budget. Analyse the itinerary, "
        "transport, accommodation, and the budget, then suggest a plan.",
        ["Itinerary", "Transport", "Accommodation", "Budget"],
        "Itinerary: avoid cramming; Tokyo (5 nights), Kyoto with a day trip to Nara (5 nights) and Osaka or "
        "Hiroshima (3 nights) balance cities, temples and food, with a rest half-day every few days for the children.\n"
        "Transport: compare a rail pass with single tickets for this route (a Tokyo-Kyoto-Hiroshima-Osaka loop often "
        "makes single tickets cheaper); use IC cards for city transit and ship large bags between hotels.\n"
        "Accommodation: family rooms are scarce in spring, so book early; apartment rentals or business hotels with "
        "connecting rooms near main stations save money and walking.\n"
        "Budget: flights are the largest item; cherry-blossom weeks push hotel prices up, so travel at the edge of "
        "the season; set a daily allowance for food and entry fees, and use convenience stores and set lunches.\n"
        "Synthesis: book flights and rooms months ahead near stations, follow the three-base itinerary with rest "
        "time, buy point-to-point tickets unless the pass is clearly cheaper, and keep a daily spending cap.",
    ),
    (
        "traffic",
        "A mid-size city wants to reduce traffic congestion downtown. Analyse public transit, cycling "
        "infrastructure, road pricing and parking, and freight deliveries, then recommend a strategy.",
        ["Public transit", "Cycling infrastructure", "Pricing and parking", "Freight deliveries"],
        "Public transit: frequent service matters more than coverage; bus lanes and signal priority on the busiest "
        "corridors raise speed and reliability, and a simple fare system lowers the barrier for occasional riders.\n"
        "Cycling infrastructure: a connected network of protected lanes from residential districts to the centre "
        "is what brings new riders; isolated paint lanes do not. Secure parking at stations allows bike-and-ride.\n"
        "Pricing and parking: congestion charges or demand-based parking prices reduce peak car trips directly; "
        "removing some on-street parking frees space for buses and bikes, and revenue can fund transit.\n"
        "Freight deliveries: delivery windows outside peak hours, loading zones that are enforced, and consolidation "
        "hubs with cargo bikes for the last kilometre reduce double parking.\n"
        "Synthesis: start with bus lanes and a protected cycling spine (quick and visible), introduce demand-based "
        "parking prices and delivery windows, fund transit with the revenue, and consider a congestion charge once "
        "alternatives are in place.",
    ),
    (
        "school-ai-policy",
        "A high school is writing a policy on students' use of AI writing tools. Analyse academic integrity, "
        "teacher training, equity of access, and student privacy, then draft the policy's main points.",
        ["Academic integrity", "Teacher training", "Equity of access", "Student privacy"],
        "Academic integrity: blanket bans are hard to enforce and detectors are unreliable; define per assignment "
        "whether AI is forbidden, allowed with disclosure, or encouraged, and assess more work in class or orally.\n"
        "Teacher training: teachers need hands-on sessions on what the tools do well and badly, how to redesign "
        "assignments around process (drafts, reflections), and how to talk to students about use.\n"
        "Equity of access: if AI use is allowed, some students have paid tools at home and others none; provide "
        "school-approved access on school devices so that permitted use does not depend on income.\n"
        "Student privacy: only tools with a data-processing agreement should be used; students must not enter "
        "personal data, and accounts for minors need parental information.\n"
        "Synthesis: a three-level permission label on each assignment, mandatory disclosure when AI is used, "
        "school-provided vetted tools, in-class assessment for key skills, and training for all staff before the "
        "policy starts, reviewed after one year.",
    ),
    (
        "budget-app",
        "A startup plans to launch a mobile budgeting app. Analyse the target users, core features, "
        "monetization, and regulation and privacy, then outline a launch plan.",
        ["Target users", "Core features", "Monetization", "Regulation and privacy"],
        "Target users: young professionals with irregular spending and students are underserved by bank apps; "
        "they want to see where money goes and reach short savings goals without manual bookkeeping.\n"
        "Core features: automatic categorisation from bank connections, a monthly budget with alerts, and savings "
        "goals; manual entry for cash. Fewer features done reliably beat a crowded dashboard.\n"
        "Monetization: a free tier with a paid subscription for multiple accounts, reports and goals works better "
        "than ads, which conflict with users' trust; avoid selling data.\n"
        "Regulation and privacy: bank connections run through licensed open-banking aggregators; store minimal "
        "data, encrypt it, support account deletion, and follow data-protection law in each market.\n"
        "Synthesis: launch in one market with an aggregator partner, ship categorisation and budgets first, test "
        "the subscription price with early users, and make privacy a visible selling point.",
    ),
    (
        "emergency-department",
        "A hospital emergency department wants to cut patient waiting times. Analyse triage, staffing, bed flow "
        "to the wards, and digital tools, then propose measures.",
        ["Triage", "Staffing", "Bed flow", "Digital tools"],
        "Triage: a senior clinician at the front door can start tests and treatment during triage and send minor "
        "cases to a fast-track stream, so simple patients stop queuing behind complex ones.\n"
        "Staffing: match rosters to the arrival pattern, which peaks late morning to evening; extra staff at those "
        "hours helps more than uniform increases.\n"
        "Bed flow: long waits are often caused by admitted patients stuck in the department; earlier ward "
        "discharges, a discharge lounge and weekend discharge capacity free beds.\n"
        "Digital tools: a live dashboard of waiting patients and bed status, and electronic test ordering from "
        "triage, reduce delays and phone calls.\n"
        "Synthesis: introduce senior triage with fast-track, shift rosters to the peaks, work with wards on "
        "discharge before noon, and use a shared dashboard to track time-to-treatment weekly.",
    ),
    (
        "farm-drought",
        "A small mixed farm faces more frequent droughts. Analyse water management, crop choice, soil health, "
        "and finances and insurance, then recommend an adaptation plan.",
        ["Water management", "Crop choice", "Soil health", "Finances and insurance"],
        "Water management: drip irrigation and scheduling by soil moisture use far less water than sprinklers; "
        "rainwater capture from roofs and a farm pond store winter rain for dry months.\n"
        "Crop choice: drought-tolerant varieties and crops (sorghum, millet, certain legumes) and earlier sowing "
        "avoid the driest weeks; diversifying crops spreads the risk.\n"
        "Soil health: cover crops, mulching and reduced tillage raise organic matter, which holds more water and "
        "lowers irrigation needs.\n"
        "Finances and insurance: weather-index insurance and a cash reserve cushion bad years; grants often cover "
        "part of irrigation upgrades.\n"
        "Synthesis: apply for grants to install drip lines and water storage, shift part of the land to tolerant "
        "crops, start cover cropping on all fields, and buy index insurance while building a reserve.",
    ),
    (
        "tech-conference",
        "Organise a 300-person technology conference. Analyse the venue, speakers and program, sponsorship, and "
        "attendee logistics, then give an organisation plan.",
        ["Venue", "Speakers and program", "Sponsorship", "Attendee logistics"],
        "Venue: one main hall for 300 plus two breakout rooms, good Wi-Fi, step-free access and public transport; "
        "book 9 to 12 months ahead and check what catering and AV are included.\n"
        "Speakers and program: an open call for talks with a review committee, a few invited keynotes, and a "
        "diverse line-up; leave breaks long enough for conversation.\n"
        "Sponsorship: tiered packages (booth, talk slot, logo) sold early cover most costs and keep tickets "
        "affordable; sponsors want leads, so give them a clear audience profile.\n"
        "Attendee logistics: online registration with ticket tiers, badges, dietary needs, a code of conduct with "
        "named contacts, and recorded talks for those who cannot come.\n"
        "Synthesis: secure the venue first, open the call for talks and sponsorship at the same time, set ticket "
        "prices after sponsorship is known, and publish the program two months before the event.",
    ),
    (
        "microservices",
        "An engineering team is considering splitting its monolithic web application into microservices. "
        "Analyse service boundaries, data management, team organisation, and operations and observability, "
        "then recommend an approach.",
        ["Service boundaries", "Data management", "Team organisation", "Operations and observability"],
        "Service boundaries: split along business capabilities that change independently (billing, catalogue, "
        "notifications), not along technical layers; badly chosen boundaries create chatty services.\n"
        "Data management: each service should own its data; shared tables must be split, and cross-service "
        "consistency then relies on events or sagas instead of database transactions.\n"
        "Team organisation: services pay off when teams can own them end to end; with one small team, the "
        "coordination cost may exceed the gain.\n"
        "Operations and observability: many services need automated deployment, centralised logs, metrics and "
        "distributed tracing from day one, or failures become hard to locate.\n"
        "Synthesis: first modularise the monolith internally, invest in CI/CD and observability, then extract one "
        "well-bounded capability with its own data, and continue only if the team structure and results justify it.",
    ),
    (
        "marathon",
        "A recreational runner who can run 10 km wants to finish a first marathon in six months. Analyse "
        "training, nutrition, injury prevention, and race-day preparation, then give a plan.",
        ["Training", "Nutrition", "Injury prevention", "Race-day preparation"],
        "Training: build weekly distance gradually (about 10% a week with an easier week every fourth), run most "
        "kilometres at an easy conversational pace, and extend the long run to 30-32 km three to four weeks before "
        "the race, followed by a taper.\n"
        "Nutrition: enough carbohydrate on heavy days, protein after sessions, and practice taking gels or drinks "
        "on long runs so the stomach is used to them.\n"
        "Injury prevention: strength work for hips and calves twice a week, rest days, rotating shoes, and backing "
        "off at the first persistent pain rather than running through it.\n"
        "Race-day preparation: test clothing and shoes on long runs, plan carbohydrate intake every 30-45 minutes, "
        "and start slower than goal pace.\n"
        "Synthesis: a 24-week plan with four runs a week and two strength sessions, a long run that grows to "
        "32 km, fuelling practised in training, and a conservative pacing strategy on the day.",
    ),
    (
        "home-energy",
        "A household wants to reduce its energy bills. Analyse heating and insulation, appliances, daily habits, "
        "and solar panels and financing, then recommend priorities.",
        ["Heating and insulation", "Appliances", "Daily habits", "Solar and financing"],
        "Heating and insulation: in most climates heating is the largest share; loft and wall insulation and "
        "draught-proofing pay back fastest, and a heat pump becomes attractive once losses are reduced.\n"
        "Appliances: replace the oldest fridge or freezer and any electric resistance heaters first; LED lighting "
        "is cheap and immediate.\n"
        "Daily habits: lower the thermostat by one degree, heat only used rooms, wash at lower temperatures and "
        "shift use to cheap tariff hours where available.\n"
        "Solar and financing: panels pay back over several years depending on sunshine and tariffs; subsidies and "
        "green loans can cover insulation and heat pumps too.\n"
        "Synthesis: change habits and lighting now, insulate and draught-proof next, then replace inefficient "
        "appliances and consider a heat pump and solar with available subsidies.",
    ),
    (
        "library",
        "A public library wants to modernise. Analyse digital services, the use of physical space, community "
        "programs, and funding, then propose a plan.",
        ["Digital services", "Physical space", "Community programs", "Funding"],
        "Digital services: e-books and audiobooks, an easy online catalogue and reservations, and loanable laptops "
        "and hotspots reach people who cannot visit or lack devices.\n"
        "Physical space: fewer rarely used shelves, more study places, bookable meeting rooms and a quiet zone; "
        "longer opening hours with self-service machines.\n"
        "Community programs: digital-skills help for older adults, homework clubs, language cafés and job-search "
        "support turn the library into a public meeting place.\n"
        "Funding: municipal budget for the core, grants and partnerships with schools and local businesses for "
        "programs, and usage statistics to justify both.\n"
        "Synthesis: weed the collection to free space for study and meeting rooms, expand digital lending and "
        "device loans, launch two or three programs with partners, and report usage to secure funding.",
    ),
    (
        "podcast",
        "Someone wants to launch an interview podcast about local history. Analyse content and format, "
        "equipment, distribution and growth, and monetization, then give a launch plan.",
        ["Content and format", "Equipment", "Distribution and growth", "Monetization"],
        "Content and format: 30-40 minute episodes with one guest each (historians, long-time residents, archive "
        "staff), a consistent structure and a release schedule that can be kept, e.g. every two weeks.\n"
        "Equipment: two dynamic USB or XLR microphones, headphones, a quiet room and free editing software suffice; "
        "sound quality matters more than video.\n"
        "Distribution and growth: publish through a host that feeds all major directories, share clips on social "
        "media, and partner with local museums, schools and newspapers.\n"
        "Monetization: local sponsors and listener donations fit a niche show; grants for cultural heritage are "
        "possible, while ads need far larger audiences.\n"
        "Synthesis: record five episodes before launch, release on a fixed biweekly schedule, grow through local "
        "partners, and approach sponsors once listener numbers are steady.",
    ),
    (
        "manufacturer-carbon",
        "A mid-size manufacturer wants to cut its carbon emissions by half in ten years. Analyse energy sourcing, "
        "process efficiency, the supply chain, and measurement and reporting, then recommend a roadmap.",
        ["Energy sourcing", "Process efficiency", "Supply chain", "Measurement and reporting"],
        "Energy sourcing: switch to renewable electricity through a supply contract or on-site solar, and replace "
        "gas-fired process heat with heat pumps or electric boilers where temperatures allow.\n"
        "Process efficiency: compressed-air leaks, motor drives, heat recovery and scheduling often cut energy use "
        "by 10-20% with short payback.\n"
        "Supply chain: purchased materials often dominate total emissions; ask key suppliers for data, prefer "
        "low-carbon materials and recycled content, and reduce transport distances.\n"
        "Measurement and reporting: a baseline inventory of scope 1, 2 and the main scope 3 sources, annual "
        "targets and a recognised reporting standard make progress verifiable.\n"
        "Synthesis: measure the baseline this year, take the efficiency wins and sign a renewable supply contract "
        "in years one and two, electrify heat as equipment is replaced, and work with the largest suppliers on "
        "material emissions.",
    ),
    (
        "heatwave",
        "A city neighbourhood must prepare for more frequent heat waves. Analyse vulnerable residents, cooling "
        "centres, urban greening, and public communication, then give a preparedness plan.",
        ["Vulnerable residents", "Cooling centres", "Urban greening", "Public communication"],
        "Vulnerable residents: elderly people living alone, people with chronic illness, outdoor workers and "
        "infants are most at risk; a register and a buddy or phone-check system reaches them during alerts.\n"
        "Cooling centres: libraries, community halls and malls with air conditioning, open long hours, within "
        "walking distance, with water and seating.\n"
        "Urban greening: street trees, green roofs and replacing asphalt lower local temperatures over years; "
        "shade at bus stops and playgrounds helps sooner.\n"
        "Public communication: early warnings through several channels and languages, clear advice on hydration "
        "and symptoms, and information on where to cool down.\n"
        "Synthesis: build the at-risk register and check-in system before summer, designate cooling centres, "
        "publish a multilingual alert plan, and start a long-term tree-planting program on the hottest streets.",
    ),
    (
        "moving-abroad",
        "An engineer has accepted a job in another country and moves in three months. Analyse visa and legal "
        "matters, housing, finances and taxes, and social integration, then give a moving plan.",
        ["Visa and legal", "Housing", "Finances and taxes", "Social integration"],
        "Visa and legal: the work permit usually comes first and takes the longest; gather certified documents, "
        "check residence registration and whether a driving licence can be exchanged.\n"
        "Housing: temporary furnished housing for the first month allows viewing flats in person; learn typical "
        "deposits and contract rules to avoid scams.\n"
        "Finances and taxes: open a local bank account early, understand the tax residence rules of both countries "
        "and any tax treaty, and keep savings for deposits and the first month.\n"
        "Social integration: start language lessons now, join professional or hobby groups, and use the employer's "
        "relocation support and colleagues for practical advice.\n"
        "Synthesis: start the visa application immediately, book a furnished first month, arrange banking and tax "
        "advice before leaving, and begin language study and community contacts in parallel.",
    ),
    (
        "rural-internet",
        "A region wants to bring fast internet to its rural villages. Analyse the technology options, funding, "
        "permits and rights of way, and adoption and digital skills, then recommend a plan.",
        ["Technology options", "Funding", "Permits and rights of way", "Adoption and digital skills"],
        "Technology options: fibre is the long-term solution but costly per home in sparse areas; fixed wireless "
        "and satellite can serve the most remote homes sooner.\n"
        "Funding: national broadband programs, public-private partnerships and co-operative models share the cost; "
        "subsidies are usually tied to coverage and speed commitments.\n"
        "Permits and rights of way: reusing ducts, poles and road works, and a single regional permit office, cut "
        "time and cost.\n"
        "Adoption and digital skills: networks only pay off if people subscribe; affordable tariffs and training "
        "for older residents and small businesses raise take-up.\n"
        "Synthesis: map coverage gaps, build fibre to villages along existing infrastructure, use fixed wireless "
        "for outlying farms, secure program funding through a partnership, and run digital-skills courses as "
        "service arrives.",
    ),
    (
        "backup-strategy",
        "A small accounting firm with 12 staff needs a data backup strategy. Analyse what must be backed up, "
        "storage and copies, protection against ransomware, and testing and recovery, then propose the strategy.",
        ["What to back up", "Storage and copies", "Ransomware protection", "Testing and recovery"],
        "What to back up: client files, the accounting database, email, and the configuration of laptops and "
        "cloud services; retention must meet legal record-keeping periods.\n"
        "Storage and copies: follow 3-2-1: three copies, on two kinds of media, one off site (a cloud backup "
        "service); daily incremental and weekly full backups.\n"
        "Ransomware protection: at least one copy immutable or offline so that malware cannot encrypt it; MFA on "
        "backup accounts and separate admin credentials.\n"
        "Testing and recovery: restore a sample of files monthly and a full system once a year, and write down "
        "who does what and how long recovery may take.\n"
        "Synthesis: a local backup appliance plus an immutable cloud copy, daily automatic backups with legal "
        "retention, MFA everywhere, and scheduled restore tests with a written recovery plan.",
    ),
    (
        "book",
        "A domain expert wants to write and publish a non-fiction book within eighteen months. Analyse research, "
        "the writing schedule, the publishing route, and marketing, then give a plan.",
        ["Research", "Writing schedule", "Publishing route", "Marketing"],
        "Research: define the book's argument and audience first, build a chapter outline, and collect sources "
        "and interviews per chapter so research does not expand without limit.\n"
        "Writing schedule: a fixed daily or weekly word target (e.g. 4,000 words a week) and a first draft within "
        "nine months leave time for revision and feedback.\n"
        "Publishing route: a traditional publisher needs a proposal and usually an agent but brings editing and "
        "distribution; self-publishing is faster and pays more per copy but requires buying editing and design.\n"
        "Marketing: an existing audience (newsletter, talks, articles) sells books; start building it while "
        "writing.\n"
        "Synthesis: write the proposal and outline in the first two months and pitch agents, draft on a weekly "
        "target regardless of the answer, choose the route by month six, and build the audience throughout.",
    ),
    (
        "active-learning",
        "A lecturer wants to redesign a 200-student introductory course around active learning. Analyse learning "
        "outcomes, in-class activities, assessment, and support and logistics, then propose the redesign.",
        ["Learning outcomes", "In-class activities", "Assessment", "Support and logistics"],
        "Learning outcomes: state what students should be able to do at the end (solve, explain, design), which "
        "then determines activities and assessment.\n"
        "In-class activities: short pre-class readings or videos, then in class concept questions with peer "
        "discussion, worked problems in small groups, and brief mini-lectures where students struggle.\n"
        "Assessment: frequent low-stakes quizzes give feedback; exams should test the stated outcomes, and part of "
        "the grade can reward preparation and participation.\n"
        "Support and logistics: with 200 students, teaching assistants circulate during group work, a response "
        "system collects answers, and a room with movable seating helps.\n"
        "Synthesis: rewrite the outcomes, convert lectures to pre-class material plus in-class problem solving, "
        "add weekly quizzes, train TAs for facilitation, and pilot with a few weeks before the full change.",
    ),
    (
        "retail-store",
        "An independent bookshop is losing sales to online retailers. Analyse an omnichannel presence, the "
        "in-store experience, inventory, and pricing and loyalty, then recommend a strategy.",
        ["Omnichannel presence", "In-store experience", "Inventory", "Pricing and loyalty"],
        "Omnichannel presence: a simple web shop with click-and-collect and local delivery lets customers buy "
        "from the shop the way they buy online.\n"
        "In-store experience: staff recommendations, author events, reading groups and a café corner give reasons "
        "to visit that online retailers cannot copy.\n"
        "Inventory: curate for the local audience, use sales data to reduce slow stock, and order any title "
        "within a day or two through the wholesaler.\n"
        "Pricing and loyalty: competing on price is hopeless; a loyalty card, subscriptions and school or "
        "book-club discounts reward regulars.\n"
        "Synthesis: launch the web shop with click-and-collect, build an events calendar, curate inventory with "
        "sales data, and introduce a loyalty program instead of discounting.",
    ),
    (
        "community-garden",
        "Residents want to start a community vegetable garden on an empty lot. Analyse the site and soil, "
        "governance and membership, water and tools, and funding and outreach, then give a plan.",
        ["Site and soil", "Governance and membership", "Water and tools", "Funding and outreach"],
        "Site and soil: get written permission from the owner, test the soil for lead and other contaminants, "
        "and use raised beds with imported soil if needed; six or more hours of sun are required.\n"
        "Governance and membership: a small committee, simple rules for plot use and shared tasks, a waiting list "
        "and a yearly fee that can be waived.\n"
        "Water and tools: a water connection or rainwater tanks, a lockable shed with shared tools, and a rota for "
        "watering in summer.\n"
        "Funding and outreach: plot fees, small grants and donations from garden centres; invite schools and "
        "neighbours so the garden is seen as a shared asset.\n"
        "Synthesis: secure a lease and a soil test first, build raised beds and a water supply with a grant, set "
        "up the committee and rules, and open with an inauguration day for the neighbourhood.",
    ),
    (
        "cafeteria-waste",
        "A school cafeteria throws away a third of its food. Analyse menu planning, portioning, student "
        "engagement, and donation and composting, then propose measures.",
        ["Menu planning", "Portioning", "Student engagement", "Donation and composting"],
        "Menu planning: track which dishes come back uneaten and replace them; pre-ordering or daily counts adjust "
        "quantities to attendance.\n"
        "Portioning: let students choose portion sizes and sides, and serve younger pupils smaller plates; offer "
        "second servings instead of large first ones.\n"
        "Student engagement: taste tests, a student food committee and waste-weighing campaigns make students part "
        "of the solution; scheduling recess before lunch reduces rushed eating.\n"
        "Donation and composting: unserved food can go to food banks under food-safety rules; plate waste goes to "
        "compost used in a school garden.\n"
        "Synthesis: measure waste by dish for a month, adjust menus and quantities, introduce choice of portions, "
        "involve a student committee, and set up donation and composting for what remains.",
    ),
    (
        "cloud-provider",
        "A ten-person startup must choose a cloud provider for its product. Analyse cost, services and features, "
        "vendor lock-in, and compliance and regions, then recommend how to decide.",
        ["Cost", "Services and features", "Vendor lock-in", "Compliance and regions"],
        "Cost: compare expected monthly bills for compute, storage and especially data egress; startup credit "
        "programs can cover the first year.\n"
        "Services and features: managed databases, queues and authentication save engineering time; check that "
        "the needed services exist and that the team knows them.\n"
        "Vendor lock-in: proprietary services speed development but make moving costly; containers, standard "
        "databases and infrastructure as code keep options open.\n"
        "Compliance and regions: customers may require data in specific regions and certifications (e.g. ISO "
        "27001, SOC 2); confirm the provider covers them.\n"
        "Synthesis: shortlist providers with the required regions and certifications, estimate costs including "
        "egress and credits, favour the one the team knows, and keep portability with containers and standard "
        "databases.",
    ),
    (
        "assisted-living",
        "A family must help an elderly parent move into assisted living. Analyse care needs, finances, the choice "
        "of facility and location, and the emotional transition, then give a plan.",
        ["Care needs", "Finances", "Facility and location", "Emotional transition"],
        "Care needs: a medical and functional assessment (mobility, memory, medication, help with daily tasks) "
        "shows whether assisted living or a nursing home fits, and how needs may grow.\n"
        "Finances: compare monthly fees with income, pensions, savings and possible public support or insurance; "
        "clarify who manages money and whether a power of attorney is needed.\n"
        "Facility and location: visit several places, check staffing, activities, inspection reports and whether "
        "care can increase on site; closeness to family enables frequent visits.\n"
        "Emotional transition: involve the parent in the decision, bring familiar furniture and photos, and plan "
        "frequent visits in the first weeks.\n"
        "Synthesis: get the assessment and legal documents done first, set the budget, visit facilities near "
        "family with the parent, and plan the move and the first month of visits together.",
    ),
    (
        "engineer-onboarding",
        "A software company wants to improve onboarding for new engineers. Analyse documentation, mentorship, the "
        "first tasks, and feedback and metrics, then propose an onboarding program.",
        ["Documentation", "Mentorship", "First tasks", "Feedback and metrics"],
        "Documentation: an up-to-date setup guide that gets a laptop to a running system in a day, an architecture "
        "overview and a glossary; new hires fix what is wrong as their first contribution.\n"
        "Mentorship: an assigned buddy for the first months, with daily check-ins in week one and weekly ones "
        "afterwards, plus a manager conversation on expectations.\n"
        "First tasks: a small real change shipped in the first week, then progressively larger tickets in one "
        "area of the code.\n"
        "Feedback and metrics: time to first merged change, a survey at 30 and 90 days and the buddy's notes show "
        "where onboarding breaks.\n"
        "Synthesis: maintain the setup guide, assign buddies, prepare starter tickets before each hire arrives, and "
        "review onboarding every quarter with the metrics and surveys.",
    ),
    (
        "museum-exhibition",
        "A museum is planning an exhibition on the history of computing. Analyse the narrative and content, "
        "objects and loans, interactive design, and accessibility, then outline the exhibition plan.",
        ["Narrative and content", "Objects and loans", "Interactive design", "Accessibility"],
        "Narrative and content: a clear story from mechanical calculators to personal computers and the internet, "
        "told through people and everyday uses, not only machines.\n"
        "Objects and loans: list key objects early; loans from other museums and private collectors take a year "
        "or more and need insurance and climate conditions.\n"
        "Interactive design: working replicas, emulated early games and a hands-on programming station engage "
        "visitors; they must be robust for heavy use.\n"
        "Accessibility: step-free routes, text at readable heights and sizes, audio descriptions, captions, and "
        "content for children and non-specialists.\n"
        "Synthesis: fix the narrative and object list first, start loan requests immediately, design interactives "
        "in parallel with testing by visitors, and review the whole layout for accessibility before building.",
    ),
    (
        "coastal-disaster",
        "A coastal town wants a disaster preparedness plan for storms and flooding. Analyse early warning, "
        "evacuation, infrastructure hardening, and recovery financing, then give the plan.",
        ["Early warning", "Evacuation", "Infrastructure hardening", "Recovery financing"],
        "Early warning: link to national forecasts, use sirens, phone alerts and local radio, and test the system "
        "every year so people recognise it.\n"
        "Evacuation: marked routes to higher ground, designated shelters, transport for people without cars and "
        "care-home residents, and regular drills.\n"
        "Infrastructure hardening: sea walls or dunes where justified, raised electrical equipment, backup power "
        "for the hospital and water plant, and no new building in the highest-risk zones.\n"
        "Recovery financing: a reserve fund, insurance for public buildings, and pre-arranged contracts for debris "
        "removal speed recovery; inform residents about flood insurance.\n"
        "Synthesis: upgrade warnings and evacuation plans first because they save lives quickly, harden critical "
        "facilities over the next years, restrict building in flood zones, and set up financing before the next storm.",
    ),
    (
        "weekend-market",
        "A town wants to launch a weekend market for local producers. Analyse vendors, location and permits, "
        "marketing, and operations and waste, then give a launch plan.",
        ["Vendors", "Location and permits", "Marketing", "Operations and waste"],
        "Vendors: recruit a balanced mix of farmers, bakers, crafts and prepared food; a modest stall fee and clear "
        "rules on local sourcing keep quality.\n"
        "Location and permits: a central square or car park with access for vans, toilets nearby and room to grow; "
        "permits for food sales, street closure and electricity must be in place.\n"
        "Marketing: a name and logo, social media, posters, local press and a launch event with music; consistent "
        "weekly opening builds habit.\n"
        "Operations and waste: a market manager, a stall layout, set-up and tear-down times, and recycling and "
        "compost bins with vendors responsible for their area.\n"
        "Synthesis: secure the site and permits, sign up twenty core vendors, open with a launch event, run "
        "weekly with a manager and clear waste rules, and adjust the mix after the first season.",
    ),
]
