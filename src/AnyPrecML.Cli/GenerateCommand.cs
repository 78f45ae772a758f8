using System.CommandLine;
using AnyPrecML.Generation;
using AnyPrecML.Models;

namespace AnyPrecML.Cli;

/// <summary>`anyprec generate`: complete a prompt, streaming tokens as they come.</summary>
internal static class GenerateCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var tokenizer = CommonOptions.Tokenizer();
        var json = CommonOptions.Json();
        var bits = CommonOptions.Width();
        var profile = CommonOptions.Profile();
        var engine = CommonOptions.Engine();
        var accuracy = CommonOptions.Accuracy();
        var kvCache = CommonOptions.KvCache();
        var device = CommonOptions.Device();
        var prompt = new Option<string>("--prompt", "-p") { Description = "Text to complete (empty: start from BOS).", DefaultValueFactory = _ => "" };
        var maxTokens = new Option<int>("--max-tokens", "-n") { Description = "Most tokens to generate.", DefaultValueFactory = _ => 256 };
        var temperature = new Option<float>("--temperature", "-t") { Description = "0 for greedy decoding.", DefaultValueFactory = _ => 0f };
        var topK = new Option<int>("--top-k") { Description = "Sample among the k most likely tokens (0: off).", DefaultValueFactory = _ => 0 };
        var topP = new Option<float>("--top-p") { Description = "Nucleus sampling threshold (1: off).", DefaultValueFactory = _ => 1f };
        var seed = new Option<ulong?>("--seed") { Description = "Sampler seed (the same seed gives the same text)." };
        var draftBits = new Option<int?>("--draft-bits") { Description = "Self-speculative decoding: draft width below --bits (the target); greedy output is unchanged, sampled output keeps the target's distribution." };
        var draftTokens = new Option<int>("--draft-tokens") { Description = "Most tokens drafted per round (k).", DefaultValueFactory = _ => 4 };
        var draftThreshold = new Option<float>("--draft-threshold") { Description = "Adaptive draft length: stop a round's drafting when the draft's top probability falls under this (0: always k).", DefaultValueFactory = _ => 0f };
        var speculate = new Option<bool>("--speculate") { Description = "Self-speculative decoding from the draft width this machine measured fastest for the target (--bits), target-only when no draft beats it (costs cached beside the model, as for --latency-budget-ms)." };
        var budget = new Option<double?>("--latency-budget-ms") { Description = "Per-token latency budget: runs the widest width (or draft/target pair) whose cost, measured on this machine and cached beside the model, meets it. Replaces --bits and --draft-bits." };
        var command = new Command("generate", "Generate text from a prompt.")
        {
            model, tokenizer, bits, profile, engine, accuracy, device, kvCache, prompt, maxTokens, temperature, topK, topP, seed, draftBits, draftTokens, draftThreshold, speculate, budget, json,
        };
        command.SetAction((r, ct) =>
        {
            using var m = CommonOptions.Load(r.GetValue(model)!, r.GetValue(tokenizer), r.GetValue(bits), r.GetValue(engine), r.GetValue(accuracy), r.GetValue(device)!, r.Err(), r.GetValue(profile), r.GetValue(kvCache));
            var options = new GenerationOptions
            {
                MaxTokens = r.GetValue(maxTokens), Temperature = r.GetValue(temperature),
                TopK = r.GetValue(topK), TopP = r.GetValue(topP), Seed = r.GetValue(seed),
                DraftBits = r.GetValue(draftBits), DraftTokens = r.GetValue(draftTokens), DraftThreshold = r.GetValue(draftThreshold),
            }.Validated();
            bool speculating = r.GetValue(speculate);
            if ((options.DraftBits is not null || speculating) && m.Engine is Quantization.ProfiledEngine)
                throw new ArgumentException($"{(speculating ? "--speculate" : "--draft-bits")} drafts and verifies at whole widths; a precision profile (--profile, or a fractional --bits) has no draft yet.");
            object? route = null;
            if (r.GetValue(budget) is double || speculating)
            {
                double? ms = r.GetValue(budget);
                string option = ms is null ? "--speculate" : "--latency-budget-ms";
                if (ms is not null && speculating) throw new ArgumentException("--speculate and --latency-budget-ms both choose the route: give one.");
                if (ms is not null && (r.GetValue(bits) is not null || r.GetValue(profile) is not null)) throw new ArgumentException("--latency-budget-ms chooses the width itself: drop --bits, --profile and --draft-bits.");
                if (options.DraftBits is not null) throw new ArgumentException($"{option} chooses the draft itself: drop --draft-bits.");
                if (m.Engine is not IAnyPrecisionEngine routed) throw new ArgumentException($"{option} routes between the widths of an any-precision model; '{r.GetValue(model)}' is not one.");
                var costs = PrecisionRouter.Load(routed, m.Checkpoint.SourcePath, $"{routed.GetType().Name} {r.GetValue(accuracy)}", out bool measured,
                    progress: ConsoleProgress.Steps(r.Err(), "measuring route costs", "routes"));
                var decision = ms is double budgetMs ? PrecisionRouter.Choose(costs, budgetMs) : PrecisionRouter.FastestFor(costs, routed.Bits);
                routed.Bits = decision.Route.Bits;
                options = options with { DraftBits = decision.Route.DraftBits, DraftTokens = decision.Route.DraftBits is null ? options.DraftTokens : decision.Route.DraftTokens };
                route = new
                {
                    budget_ms = ms, bits = decision.Route.Bits, draft_bits = decision.Route.DraftBits, draft_tokens = decision.Route.DraftTokens,
                    ms_per_token = Math.Round(decision.Route.MsPerToken, 4), reason = decision.Reason, costs = measured ? "measured now" : "cached",
                };
                r.Err().WriteLine($"route: {decision.Reason} (costs {(measured ? "measured now" : "cached")})");
            }
            if (options.DraftBits is not null && m.Engine is not IAnyPrecisionEngine)
                throw new ArgumentException($"--draft-bits applies to any-precision models; '{r.GetValue(model)}' is not one (quantize it with `anyprec quantize`).");
            if (options.DraftBits is int d && m.Engine is IAnyPrecisionEngine ape && (d < ape.SeedBits || d >= ape.Bits))
                throw new ArgumentException($"--draft-bits {d} must be in {ape.SeedBits}..{ape.Bits - 1}, below the target width {ape.Bits} (--bits).");
            var generator = new TextGenerator(m.Engine, m.Tokenizer);
            if (r.GetValue(json))
            {
                var result = generator.Generate(r.GetValue(prompt)!, options, ct);
                r.WriteJson(new
                {
                    text = result.Text, tokens = result.Tokens, tokens_per_second = Math.Round(result.TokensPerSecond, 2), stop_reason = result.StopReason,
                    speculative = result.Speculation is { } s ? Json(s, options, result.TokensPerTargetStep) : null,
                    route, widths = PerplexityCommand.Widths(m.Engine),
                });
                return Task.FromResult(0);
            }
            var o = r.Out();
            var sw = System.Diagnostics.Stopwatch.StartNew();
            int tokens = 0;
            o.Write(r.GetValue(prompt));
            SpeculationStats? speculation = null;
            foreach (var step in generator.GenerateTokens(r.GetValue(prompt)!, options, x => speculation = x, ct))
            {
                o.Write(step.Text);
                o.Flush();
                if (step.StopReason != "eos") tokens++;
            }
            o.WriteLine();
            r.Err().WriteLine($"{tokens} tokens, {tokens / sw.Elapsed.TotalSeconds:F1} tokens/s");
            if (speculation is { } sp)
                r.Err().WriteLine($"speculative {sp.DraftBits} -> {sp.TargetBits} bits: drafted {sp.Drafted}, accepted {sp.Accepted}, rejected {sp.Rejected} (acceptance {sp.AcceptanceRate:P0}), {sp.TargetSteps} target steps ({(double)tokens / Math.Max(1, sp.TargetSteps):F2} tokens per step)");
            return Task.FromResult(0);
        });
        return command;
    }

    private static object Json(SpeculationStats s, GenerationOptions o, double tokensPerTargetStep) => new
    {
        draft_bits = s.DraftBits, target_bits = s.TargetBits, draft_tokens = o.DraftTokens, draft_threshold = o.DraftThreshold,
        drafted = s.Drafted, accepted = s.Accepted, rejected = s.Rejected, acceptance_rate = Math.Round(s.AcceptanceRate, 4),
        target_steps = s.TargetSteps, draft_steps = s.DraftSteps, tokens_per_target_step = Math.Round(tokensPerTargetStep, 3),
    };
}
